//! The web console, served by every replica that serves the API, at `/` on `api.bind`:
//! server-rendered pages (`pages`), a stylesheet and a small script embedded in the binary
//! (`assets/`), no network at run time.
//!
//! Auth is the API's: with `api.tokens` set, a person signs in once with a token and gets a
//! signed session cookie (`session`; HttpOnly, SameSite=Strict, Secure behind TLS) that every
//! replica accepts. A read token sees everything with secrets redacted and no action; a change
//! needs an admin session and its form's CSRF token, and a request from another origin is
//! refused. Without tokens the console opens as the API does.
//!
//! Never SQL: it reads and acts through `queue`, `agents` and `fleet`, like the API.

pub mod pages;
pub mod session;
pub mod view;

use std::sync::{Arc, OnceLock};

use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::Deserialize;

use crate::api::ApiState;
use crate::config::Scope;
use crate::queue::{Status, TaskFilter};
use session::Session;

type Shared = State<Arc<ApiState>>;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// The console's routes (merged into the API's router by `api::router`).
pub fn routes(state: Arc<ApiState>) -> Router<Arc<ApiState>> {
    let pages = Router::new()
        .route("/", get(overview))
        .route("/tasks", get(tasks))
        .route("/tasks/bulk", post(bulk))
        .route("/tasks/{id}", get(task))
        .route("/tasks/{id}/events", get(task_events))
        .route("/tasks/{id}/{action}", post(task_action))
        .route("/agents", get(agents))
        .route("/agents/{name}", get(agent))
        .route("/agents/{name}/edit", post(edit_agent))
        .route("/agents/{name}/{action}", post(agent_action))
        .route("/fleet", get(fleet))
        .route("/fleet/{replica}/resume", post(resume_replica))
        .route("/fleet/lift-quarantines", post(lift_quarantines))
        .route("/fleet/queues/{name}/{action}", post(queue_action))
        .route("/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(state, signed_in));
    Router::new()
        .route("/login", get(login_page).post(login))
        .route(
            "/assets/console.css",
            get(|| async { asset(CSS, "text/css") }),
        )
        .route(
            "/assets/console.js",
            get(|| async { asset(JS, "text/javascript") }),
        )
        .merge(pages)
        .layer(middleware::from_fn(security_headers))
}

/// What the browser may do with the console's pages: run only its own script and style,
/// connect only back here, never be framed (clickjacking), never guess a content type.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
             form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, format!("{kind}; charset=utf-8")),
            (header::CACHE_CONTROL, "no-cache".to_string()),
        ],
        body,
    )
        .into_response()
}

/// The session of a request without tokens configured: admin, with a CSRF token of this
/// process (a page of another replica cannot post here, which only matters in development).
fn open_session() -> Session {
    static KEY: OnceLock<String> = OnceLock::new();
    let csrf = KEY.get_or_init(|| {
        (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect()
    });
    Session {
        scope: Scope::Admin,
        csrf: csrf.clone(),
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn cookie_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == session::COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Whether the request says it comes from another site (a form another page posts here).
fn cross_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (
        headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()),
        host,
    ) {
        (Some(origin), Some(host)) => {
            let origin_host = origin.split("://").nth(1).unwrap_or(origin);
            origin == "null" || origin_host != host
        }
        _ => false,
    }
}

/// Pages need a session (a sign-in with a token when tokens are configured); changes need
/// an admin session from this origin.
async fn signed_in(State(st): Shared, mut req: Request, next: Next) -> Response {
    let session = if st.tokens.is_empty() {
        Some(open_session())
    } else {
        cookie_of(req.headers()).and_then(|c| session::check(&st.tokens, &c, now()))
    };
    let reads = req.method() == axum::http::Method::GET;
    let Some(session) = session else {
        if reads {
            let next = req
                .uri()
                .path_and_query()
                .map_or("/".to_string(), |p| p.to_string());
            let to = format!(
                "/login?{}",
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("next", &next)
                    .finish()
            );
            return Redirect::to(&to).into_response();
        }
        return (StatusCode::UNAUTHORIZED, "sign in first").into_response();
    };
    if !reads {
        if cross_origin(req.headers()) {
            return (StatusCode::FORBIDDEN, "a request from another origin").into_response();
        }
        if session.scope != Scope::Admin && req.uri().path() != "/logout" {
            return (
                StatusCode::FORBIDDEN,
                "a read token may not change anything",
            )
                .into_response();
        }
    }
    req.extensions_mut().insert(session);
    next.run(req).await
}

#[derive(Debug, Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

/// Where to go after signing in: a path of this console, never another site.
fn safe_next(next: Option<&str>) -> String {
    match next {
        // Browsers drop tabs and newlines from a URL: "/\t/evil" would become "//evil".
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && !n.chars().any(|c| c.is_control()) =>
        {
            n.to_string()
        }
        _ => "/".to_string(),
    }
}

async fn login_page(State(st): Shared, Query(q): Query<LoginQuery>) -> Response {
    if st.tokens.is_empty() {
        return Redirect::to(&safe_next(q.next.as_deref())).into_response();
    }
    pages::login(None, &safe_next(q.next.as_deref())).into_response()
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(State(st): Shared, headers: HeaderMap, Form(f): Form<LoginForm>) -> Response {
    let next = safe_next(f.next.as_deref());
    if cross_origin(&headers) {
        return (StatusCode::FORBIDDEN, "a request from another origin").into_response();
    }
    let Some(token) = session::token_of(&st.tokens, &f.token) else {
        // The page again, with the reason (a 401 would only add a console error).
        return pages::login(Some("That is not a token of this fleet."), &next).into_response();
    };
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        session::COOKIE,
        session::issue(token, now()),
        session::LIFETIME_S,
        if secure { "; Secure" } else { "" }
    );
    let mut r = Redirect::to(&next).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    csrf: String,
}

fn csrf_refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        "the form's token does not match this session; reload the page",
    )
        .into_response()
}

async fn logout(Extension(s): Extension<Session>, Form(f): Form<CsrfForm>) -> Response {
    if !session::csrf_ok(&s, &f.csrf) {
        return csrf_refused();
    }
    let mut r = Redirect::to("/login").into_response();
    let gone = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        session::COOKIE
    );
    if let Ok(v) = HeaderValue::from_str(&gone) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn failed(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "a console page failed");
    (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
}

async fn overview(State(st): Shared, Extension(s): Extension<Session>) -> Response {
    let max_age = std::time::Duration::from_secs(st.config.persistence.rescue_after_s);
    let counts = match crate::queue::capped_counts(&st.pool, pages::COUNT_CAP).await {
        Ok(d) => d,
        Err(e) => return failed(e),
    };
    let total_estimate = crate::queue::estimated_total(&st.pool).await.unwrap_or(0);
    let minutes = match crate::fleet::health::minutes(&st.pool, 60).await {
        Ok(m) => m,
        Err(e) => return failed(e),
    };
    let replicas = match crate::fleet::replicas::list(&st.pool, max_age).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let quarantines = match crate::fleet::quarantines::active(&st.pool).await {
        Ok(q) => q,
        Err(e) => return failed(e),
    };
    let escalations = match crate::fleet::health::recent_escalations(&st.pool, 10).await {
        Ok(e) => e,
        Err(e) => return failed(e),
    };
    let failing = match failing_agents(&st).await {
        Ok(f) => f,
        Err(e) => return failed(e),
    };
    pages::overview(
        &s,
        &pages::Overview {
            counts: &counts,
            total_estimate,
            minutes: &minutes,
            failing: &failing,
            replicas: &replicas,
            quarantines: &quarantines,
            escalations: &escalations,
        },
        chrono::Utc::now(),
    )
    .into_response()
}

/// Agents with runs that failed in the last hour, most first (five), looking at each agent's
/// last 60 runs: bounded work per agent (tasks_agent_id_idx), never the whole table.
async fn failing_agents(
    st: &ApiState,
) -> Result<Vec<(String, crate::queue::RunStats)>, crate::queue::Error> {
    let Some(registry) = st.agents.as_ref() else {
        return Ok(Vec::new());
    };
    let agents = registry.list().await.unwrap_or_default();
    let ids: Vec<i64> = agents.iter().map(|a| a.id).collect();
    let mut stats = st
        .queue
        .run_stats(crate::agents::AGENT_KIND, &ids, 60)
        .await?;
    let mut failing: Vec<(String, crate::queue::RunStats)> = agents
        .into_iter()
        .filter_map(|a| stats.remove(&a.id).map(|s| (a.name, s)))
        .filter(|(_, s)| s.failed_last_hour > 0)
        .collect();
    failing.sort_by(|a, b| {
        b.1.failed_last_hour
            .cmp(&a.1.failed_last_hour)
            .then(a.0.cmp(&b.0))
    });
    failing.truncate(5);
    Ok(failing)
}

/// Ids a filter no index serves may look at per page: bounded work at any table size.
const WINDOW: i64 = 20_000;

/// A time filter's value: `2026-12-01T09:30` (a browser's datetime-local, UTC here), with
/// seconds, or RFC 3339.
fn parse_time(field: &str, v: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    for f in [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(v, f) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    Err(format!(
        "{field} {v:?} is not a time; use 2026-12-01T09:30 (UTC) or RFC 3339"
    ))
}

async fn tasks(
    State(st): Shared,
    Extension(s): Extension<Session>,
    Query(q): Query<pages::TaskQuery>,
) -> Response {
    let refuse = |e: &str| pages::tasks(&s, &q, &Default::default(), Some(e)).into_response();
    // Going to one task: by id, else by idempotency key.
    if let Some(wanted) = q.q.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
        let id = match wanted.parse::<i64>() {
            Ok(id) => match st.queue.status(id).await {
                Ok(_) => Some(id),
                Err(crate::queue::Error::NotFound(_)) => None,
                Err(e) => return failed(e),
            },
            Err(_) => None,
        };
        let id = match id {
            Some(id) => Some(id),
            None => match st.queue.find_by_key(wanted).await {
                Ok(id) => id,
                Err(e) => return failed(e),
            },
        };
        return match id {
            Some(id) => Redirect::to(&format!("/tasks/{id}")).into_response(),
            None => refuse(&format!(
                "No task has the id or idempotency key {wanted:?}."
            )),
        };
    }
    let status = match q.status.as_deref().filter(|v| !v.is_empty()) {
        Some(v) => match Status::parse(v) {
            Some(s) => Some(s),
            None => {
                let allowed: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
                return refuse(&format!(
                    "status {v:?} is not a status; allowed: {}",
                    allowed.join(", ")
                ));
            }
        },
        None => None,
    };
    let agent_id = match q.agent.as_deref().filter(|v| !v.is_empty()) {
        Some(name) => match crate::agents::id_of(&st.pool, name).await {
            Ok(id) => Some(id),
            Err(_) => return refuse(&format!("No agent is named {name:?}.")),
        },
        None => None,
    };
    let kind = q.kind.clone().filter(|k| !k.is_empty());
    if kind.as_deref().is_some_and(crate::db::text::has_nul) {
        return refuse("kind holds a NUL character, which no kind has");
    }
    let Some((lowest, highest)) = (match st.queue.id_range().await {
        Ok(r) => r,
        Err(e) => return failed(e),
    }) else {
        return pages::tasks(&s, &q, &Default::default(), None).into_response();
    };
    // Time filters become id bounds (tasks are created in id order).
    // A page starts at most just above the newest task.
    let mut before = q.before.map(|b| b.min(highest + 1));
    let mut after = None;
    if let Some(v) = q.until.as_deref().filter(|v| !v.is_empty()) {
        let t = match parse_time("until", v) {
            Ok(t) => t,
            Err(e) => return refuse(&e),
        };
        match st.queue.first_id_since((lowest, highest), t).await {
            Ok(Some(id)) => before = Some(before.map_or(id, |b| b.min(id))),
            Ok(None) => {}
            Err(e) => return failed(e),
        }
    }
    if let Some(v) = q.since.as_deref().filter(|v| !v.is_empty()) {
        let t = match parse_time("since", v) {
            Ok(t) => t,
            Err(e) => return refuse(&e),
        };
        match st.queue.first_id_since((lowest, highest), t).await {
            Ok(Some(id)) => after = Some(id - 1),
            Ok(None) => return pages::tasks(&s, &q, &Default::default(), None).into_response(),
            Err(e) => return failed(e),
        }
    }
    // A status or kind without an agent has no index in id order: look at a bounded window
    // of ids below `before` and say how far the page searched.
    let floor = after.unwrap_or(lowest - 1);
    let window = (agent_id.is_none() && (status.is_some() || kind.is_some()))
        .then(|| before.unwrap_or(highest + 1).saturating_sub(WINDOW + 1))
        .filter(|lo| *lo > floor);
    let filter = TaskFilter {
        status,
        kind,
        agent_id,
        before,
        after: window.or(after),
        limit: pages::PAGE,
        offset: 0,
    };
    let list = match st.queue.list(&filter).await {
        Ok(l) => l,
        Err(e) => return failed(e),
    };
    let full = list.len() as i64 == pages::PAGE;
    let (older, searched_to) = match (full, window) {
        (true, _) => (list.last().map(|t| t.id), None),
        (false, Some(lo)) => (Some(lo + 1), Some(lo + 1)),
        (false, None) => (None, None),
    };
    let ids: Vec<i64> = list.iter().filter_map(|t| t.agent_id).collect();
    let names = crate::agents::names_of(&st.pool, &ids)
        .await
        .unwrap_or_default();
    let listing = pages::TaskListing {
        tasks: list,
        names,
        older,
        searched_to,
    };
    pages::tasks(&s, &q, &listing, None).into_response()
}

/// At most this many tasks per bulk action (a page shows 50).
const BULK_MAX: usize = 500;

/// Retry, cancel or delete the selected tasks; back to the list with what was done.
async fn bulk(
    State(st): Shared,
    Extension(s): Extension<Session>,
    body: axum::body::Bytes,
) -> Response {
    let (mut csrf, mut action, mut back, mut ids) =
        (String::new(), String::new(), None, Vec::new());
    for (k, v) in form_urlencoded::parse(&body) {
        match &*k {
            "csrf" => csrf = v.into_owned(),
            "action" => action = v.into_owned(),
            "back" => back = Some(v.into_owned()),
            "id" => match v.parse::<i64>() {
                Ok(id) => ids.push(id),
                Err(_) => {
                    return (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("id {v:?} is not a task id"),
                    )
                        .into_response();
                }
            },
            _ => {}
        }
    }
    if !session::csrf_ok(&s, &csrf) {
        return csrf_refused();
    }
    if !matches!(action.as_str(), "retry" | "cancel" | "delete") {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            "action must be retry, cancel or delete",
        )
            .into_response();
    }
    if ids.len() > BULK_MAX {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{} tasks selected; at most {BULK_MAX} at once", ids.len()),
        )
            .into_response();
    }
    ids.sort_unstable();
    ids.dedup();
    let (mut done, mut skipped) = (0u32, 0u32);
    for id in ids {
        let r = match action.as_str() {
            "retry" => st.queue.retry(id).await.map(|_| ()),
            "cancel" => st.queue.cancel(id).await.map(|_| ()),
            _ => st.queue.delete(id).await,
        };
        match r {
            Ok(()) => done += 1,
            Err(crate::queue::Error::WrongState { .. } | crate::queue::Error::NotFound(_)) => {
                skipped += 1
            }
            Err(e) => return failed(e),
        }
    }
    let back = safe_next(back.as_deref());
    let (path, query) = back.split_once('?').unwrap_or((&back, ""));
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if !matches!(&*k, "bulk" | "done" | "skipped") {
            q.append_pair(&k, &v);
        }
    }
    q.append_pair("bulk", &action);
    q.append_pair("done", &done.to_string());
    q.append_pair("skipped", &skipped.to_string());
    Redirect::to(&format!("{path}?{}", q.finish())).into_response()
}

async fn task(
    State(st): Shared,
    Extension(s): Extension<Session>,
    Path(id): Path<i64>,
) -> Response {
    let mut t = match st.queue.get_with_progress(id).await {
        Ok(t) => t,
        Err(crate::queue::Error::NotFound(_)) => {
            let page = pages::not_found(&s, &format!("There is no task {id}."));
            return (StatusCode::NOT_FOUND, page).into_response();
        }
        Err(e) => return failed(e),
    };
    if s.scope != Scope::Admin {
        crate::api::redact_env_at(&mut t.payload, "/env");
    }
    let agent = match t.agent_id {
        Some(a) => crate::agents::names_of(&st.pool, &[a])
            .await
            .ok()
            .and_then(|mut m| m.remove(&a)),
        None => None,
    };
    pages::task(&s, &t, agent.as_deref()).into_response()
}

async fn task_events(State(st): Shared, Path(id): Path<i64>, headers: HeaderMap) -> Response {
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(':'))
        .and_then(|(a, s)| Some((a.parse().ok()?, s.parse().ok()?)));
    crate::api::follow_logs(st.queue.clone(), st.draining.clone(), id, after).into_response()
}

async fn task_action(
    State(st): Shared,
    Extension(s): Extension<Session>,
    Path((id, action)): Path<(i64, String)>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !session::csrf_ok(&s, &f.csrf) {
        return csrf_refused();
    }
    let done = match action.as_str() {
        "retry" => st.queue.retry(id).await.map(|t| format!("/tasks/{}", t.id)),
        "cancel" => st.queue.cancel(id).await.map(|_| format!("/tasks/{id}")),
        "delete" => st.queue.delete(id).await.map(|()| "/tasks".to_string()),
        _ => return (StatusCode::NOT_FOUND, "no such action").into_response(),
    };
    match done {
        Ok(to) => Redirect::to(&to).into_response(),
        Err(e @ crate::queue::Error::WrongState { .. }) => {
            (StatusCode::CONFLICT, e.to_string()).into_response()
        }
        Err(crate::queue::Error::NotFound(_)) => {
            (StatusCode::NOT_FOUND, format!("there is no task {id}")).into_response()
        }
        Err(e) => failed(e),
    }
}

fn no_agents() -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        "this replica does not run agents",
    )
        .into_response()
}

async fn agents(State(st): Shared, Extension(s): Extension<Session>) -> Response {
    let Some(registry) = st.agents.as_ref() else {
        return no_agents();
    };
    let list = match registry.list().await {
        Ok(l) => l,
        Err(e) => return failed(e),
    };
    let ids: Vec<i64> = list.iter().map(|a| a.id).collect();
    let stats = st
        .queue
        .run_stats(crate::agents::AGENT_KIND, &ids, pages::RECENT_RUNS)
        .await
        .unwrap_or_default();
    let quarantines = crate::fleet::quarantines::active(&st.pool)
        .await
        .unwrap_or_default();
    let lines: Vec<pages::AgentLine<'_>> = list
        .iter()
        .map(|a| pages::AgentLine {
            agent: a,
            stats: stats.get(&a.id),
            quarantine: quarantines.iter().find(|q| q.agent_id == Some(a.id)),
        })
        .collect();
    pages::agents(&s, &lines).into_response()
}

async fn agent_page(
    st: &ApiState,
    s: &Session,
    name: &str,
    error: Option<&str>,
    edit: Option<&pages::AgentEdit>,
) -> Response {
    let Some(registry) = st.agents.as_ref() else {
        return no_agents();
    };
    let a = match registry.get(name).await {
        Ok(a) => a,
        Err(crate::agents::Error::NotFound(_)) | Err(crate::agents::Error::Invalid { .. }) => {
            let page = pages::not_found(s, &format!("There is no agent {name:?}."));
            return (StatusCode::NOT_FOUND, page).into_response();
        }
        Err(e) => return failed(e),
    };
    let mut settings = serde_json::to_value(&a.settings).unwrap_or_default();
    let mut config = serde_json::Value::Object(a.config.clone());
    if s.scope != Scope::Admin {
        crate::api::redact_env_at(&mut settings, "/env");
        crate::api::redact_secrets(&mut config);
    }
    let runs = st
        .queue
        .list(&TaskFilter {
            agent_id: Some(a.id),
            limit: 20,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    let stats = st
        .queue
        .run_stats(crate::agents::AGENT_KIND, &[a.id], pages::RECENT_RUNS)
        .await
        .unwrap_or_default();
    let handoffs = registry.handoffs().history(a.id).await.unwrap_or_default();
    let quarantines = crate::fleet::quarantines::active(&st.pool)
        .await
        .unwrap_or_default();
    // A refused form comes back as the page with the reason (a 422 would only add a console
    // error, as on the sign-in page).
    let page = pages::agent(
        s,
        &pages::AgentPage {
            agent: &a,
            settings,
            config,
            quarantine: quarantines.iter().find(|q| q.agent_id == Some(a.id)),
            stats: stats.get(&a.id),
            runs: &runs,
            handoffs: &handoffs,
            error,
            edit,
        },
    );
    page.into_response()
}

async fn agent(
    State(st): Shared,
    Extension(s): Extension<Session>,
    Path(name): Path<String>,
) -> Response {
    agent_page(&st, &s, &name, None, None).await
}

#[derive(Debug, Deserialize)]
struct AgentForm {
    csrf: String,
    input: Option<String>,
    /// Where to go after a pause or resume (a path of this console; default the agent).
    back: Option<String>,
}

async fn agent_action(
    State(st): Shared,
    Extension(s): Extension<Session>,
    Path((name, action)): Path<(String, String)>,
    Form(f): Form<AgentForm>,
) -> Response {
    if !session::csrf_ok(&s, &f.csrf) {
        return csrf_refused();
    }
    let Some(registry) = st.agents.as_ref() else {
        return no_agents();
    };
    let back = match f.back.as_deref() {
        Some(b) => safe_next(Some(b)),
        None => format!("/agents/{name}"),
    };
    let done = match action.as_str() {
        "run" => {
            let input = match f.input.as_deref().map(str::trim).filter(|i| !i.is_empty()) {
                None => serde_json::Value::Null,
                Some(raw) => match serde_json::from_str(raw) {
                    Ok(v) => v,
                    Err(e) => {
                        let error = format!("The input is not valid JSON: {e}");
                        return agent_page(&st, &s, &name, Some(&error), None).await;
                    }
                },
            };
            registry
                .run(&st.queue, &name, input)
                .await
                .map(|e| format!("/tasks/{}", e.id))
        }
        "pause" => registry.set_active(&name, false).await.map(|_| back),
        "resume" => match registry.set_active(&name, true).await {
            Ok(a) => registry.lift_quarantine(&a).await.map(|_| back),
            Err(e) => Err(e),
        },
        _ => return (StatusCode::NOT_FOUND, "no such action").into_response(),
    };
    match done {
        Ok(to) => Redirect::to(&to).into_response(),
        Err(crate::agents::Error::NotFound(_)) => {
            (StatusCode::NOT_FOUND, format!("there is no agent {name:?}")).into_response()
        }
        Err(e) => failed(e),
    }
}

/// The agent edit form: schedule, time zone, limits and config, validated as the CLI's
/// `agents update` is; refused, the page comes back with the reason and what was typed.
async fn edit_agent(
    State(st): Shared,
    Extension(s): Extension<Session>,
    Path(name): Path<String>,
    Form(f): Form<pages::AgentEdit>,
) -> Response {
    if !session::csrf_ok(&s, &f.csrf) {
        return csrf_refused();
    }
    let Some(registry) = st.agents.as_ref() else {
        return no_agents();
    };
    let current = match registry.get(&name).await {
        Ok(a) => a,
        Err(crate::agents::Error::NotFound(_)) | Err(crate::agents::Error::Invalid { .. }) => {
            return (StatusCode::NOT_FOUND, format!("there is no agent {name:?}")).into_response();
        }
        Err(e) => return failed(e),
    };
    let (settings, config) = match edited(&current, &f) {
        Ok(v) => v,
        Err(e) => return agent_page(&st, &s, &name, Some(&e), Some(&f)).await,
    };
    match registry
        .update(&name, current.runtime.clone(), settings, config)
        .await
    {
        Ok(_) => Redirect::to(&format!("/agents/{name}")).into_response(),
        Err(crate::agents::Error::Invalid { field, reason }) => {
            let e = format!("{field}: {reason}");
            agent_page(&st, &s, &name, Some(&e), Some(&f)).await
        }
        Err(e) => failed(e),
    }
}

/// The settings and config the edit form asks for, or what is wrong with a field.
fn edited(
    current: &crate::agents::Agent,
    f: &pages::AgentEdit,
) -> Result<(crate::agents::AgentSettings, crate::agents::AgentOwnConfig), String> {
    fn number<T: std::str::FromStr>(field: &str, v: &str) -> Result<T, String> {
        v.trim()
            .parse()
            .map_err(|_| format!("{field}: {v:?} is not a whole number"))
    }
    let text = |v: &str| Some(v.trim().to_string()).filter(|v| !v.is_empty());
    let mut settings = current.settings.clone();
    settings.schedule = text(&f.schedule);
    settings.timezone = text(&f.timezone);
    settings.timeout = number("timeout", &f.timeout)?;
    settings.max_retries = number("max_retries", &f.max_retries)?;
    settings.memory_mb = number("memory_mb", &f.memory_mb)?;
    settings.cpu_percent = number("cpu_percent", &f.cpu_percent)?;
    let config = match f.config.trim() {
        "" => Default::default(),
        raw => match serde_json::from_str::<serde_json::Value>(raw) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(other) => {
                return Err(format!(
                    "config: must be a JSON object ({{\"key\": value}}), not {}",
                    crate::db::text::json_type(&other)
                ));
            }
            Err(e) => return Err(format!("config: not valid JSON: {e}")),
        },
    };
    Ok((settings, config))
}

async fn fleet(State(st): Shared, Extension(s): Extension<Session>) -> Response {
    let max_age = std::time::Duration::from_secs(st.config.persistence.rescue_after_s);
    let replicas = match crate::fleet::replicas::list(&st.pool, max_age).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let quarantines = crate::fleet::quarantines::active(&st.pool)
        .await
        .unwrap_or_default();
    let events = crate::fleet::health::recent_events(&st.pool, 50)
        .await
        .unwrap_or_default();
    let ids: Vec<String> = replicas.iter().map(|r| r.id.clone()).collect();
    let samples = crate::fleet::health::samples(&st.pool, &ids, 60)
        .await
        .unwrap_or_default();
    let queues = crate::fleet::serving::queues(&st.pool, max_age)
        .await
        .unwrap_or_default();
    pages::fleet(
        &s,
        &replicas,
        &queues,
        &samples,
        &quarantines,
        &events,
        chrono::Utc::now(),
    )
    .into_response()
}

async fn resume_replica(
    State(st): Shared,
    Extension(s): Extension<Session>,
    Path(replica): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !session::csrf_ok(&s, &f.csrf) {
        return csrf_refused();
    }
    match crate::fleet::replicas::request_resume(&st.pool, Some(&replica)).await {
        Ok(_) => Redirect::to("/fleet").into_response(),
        Err(e) => failed(e),
    }
}

/// Pause or resume a queue fleet-wide (`action`: pause or resume).
async fn queue_action(
    State(st): Shared,
    Extension(s): Extension<Session>,
    Path((name, action)): Path<(String, String)>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !session::csrf_ok(&s, &f.csrf) {
        return csrf_refused();
    }
    let done = match action.as_str() {
        "pause" => crate::queue::queues::pause(&st.pool, &name, "paused from the console").await,
        "resume" => crate::queue::queues::resume(&st.pool, &name).await,
        _ => {
            let page = pages::not_found(&s, &format!("There is no queue action {action:?}."));
            return (StatusCode::NOT_FOUND, page).into_response();
        }
    };
    match done {
        Ok(_) => Redirect::to("/fleet").into_response(),
        Err(e) => failed(e),
    }
}

async fn lift_quarantines(
    State(st): Shared,
    Extension(s): Extension<Session>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !session::csrf_ok(&s, &f.csrf) {
        return csrf_refused();
    }
    match crate::fleet::quarantines::lift(&st.pool, None).await {
        Ok(_) => Redirect::to("/fleet").into_response(),
        Err(e) => failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_signing_in_a_person_goes_only_to_a_page_of_this_console() {
        assert_eq!(
            safe_next(Some("/tasks?status=failed")),
            "/tasks?status=failed"
        );
        for bad in [
            "https://evil.example",
            "//evil.example",
            "/\\evil",
            "tasks",
            "/\t/evil.example",
            "/\n/evil.example",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn a_time_filter_takes_a_browser_s_local_time_as_utc_or_rfc_3339() {
        let t = |v| parse_time("since", v).map(|t| t.to_rfc3339());
        assert_eq!(t("2026-12-01T09:30").unwrap(), "2026-12-01T09:30:00+00:00");
        assert_eq!(
            t("2026-12-01T09:30:15").unwrap(),
            "2026-12-01T09:30:15+00:00"
        );
        assert_eq!(t("2026-12-01").unwrap(), "2026-12-01T00:00:00+00:00");
        assert_eq!(
            t("2026-12-01T10:30:00+01:00").unwrap(),
            "2026-12-01T09:30:00+00:00"
        );
        let e = t("yesterday").unwrap_err();
        assert!(e.starts_with("since \"yesterday\" is not a time"), "{e}");
        assert_eq!(pages::thousands(0), "0");
        assert_eq!(pages::thousands(999), "999");
        assert_eq!(pages::thousands(1_000_000), "1,000,000");
        assert_eq!(pages::thousands(-12_345), "-12,345");
    }

    #[test]
    fn the_stylesheet_has_a_dark_theme_the_system_preference_selects() {
        assert!(CSS.contains("color-scheme: light dark;"));
        let dark = CSS
            .split("@media (prefers-color-scheme: dark)")
            .nth(1)
            .expect("a dark block");
        for var in ["--bg:", "--fg:", "--panel:", "--accent:"] {
            assert!(dark.contains(var), "the dark theme sets {var}");
        }
    }

    #[test]
    fn a_form_from_another_origin_is_told_apart() {
        let h = |origin: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
            if let Some(o) = origin {
                h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
            }
            h
        };
        assert!(!cross_origin(&h(None)));
        assert!(!cross_origin(&h(Some("http://127.0.0.1:8080"))));
        assert!(cross_origin(&h(Some("https://evil.example"))));
        assert!(cross_origin(&h(Some("null"))));
    }
}
