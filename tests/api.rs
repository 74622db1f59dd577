//! The REST API over real HTTP against a real replica and PostgreSQL.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::TestDb;
use harness::agents::Agents;
use harness::api::{ApiState, router};
use harness::executor::Executor;
use harness::queue::Status;
use harness::replica::builtin_handlers;
use harness::{Config, Harness};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-token-0123456789";

struct Api {
    base: String,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    replica: String,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(ADMIN)
    }
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(ADMIN)
    }
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.served.take().unwrap().await.unwrap();
    }
}

/// A replica (with a `flaky` kind that fails while the flag is set) and its API.
async fn start(db: &TestDb, flaky: Arc<AtomicBool>) -> Api {
    start_with(db, flaky, &[]).await
}

/// [`start`] with more settings (`HARNESS_*` variables).
async fn start_with(db: &TestDb, flaky: Arc<AtomicBool>, extra: &[(&str, &str)]) -> Api {
    let tokens =
        format!(r#"[{{"token":"{ADMIN}","scope":"admin"}},{{"token":"{READ}","scope":"read"}}]"#);
    let mut env = vec![
        ("HARNESS_API__MAX_BODY_KB", "4"),
        ("HARNESS_API__TOKENS", tokens.as_str()),
    ];
    env.extend_from_slice(extra);
    let cfg = db.fast_config(&env);
    let executor = Arc::new(Executor::new(&cfg.executor).unwrap());
    let agents = Agents::new(db.pool.clone(), executor);
    let h = builtin_handlers(Harness::builder())
        .agents(agents.clone())
        .handler("flaky", move |_p: Value| {
            let fail = flaky.load(Ordering::SeqCst);
            async move {
                if fail {
                    Err("flaky failure".to_string())
                } else {
                    Ok(json!({"ok": true}))
                }
            }
        })
        .config(cfg.clone())
        .pool(db.pool.clone())
        .build()
        .await
        .unwrap();
    let state = Arc::new(ApiState {
        queue: h.queue().clone(),
        agents: Some(agents),
        pool: db.pool.clone(),
        tokens: cfg.api.tokens.clone(),
        registry: h.registry(),
        config: cfg,
        draining: tokio_util::sync::CancellationToken::new(),
    });
    let replica = h.replica_id().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let stop = tokio_util::sync::CancellationToken::new();
    let limits = harness::api::server::ServerLimits::from_config(&state.config.api);
    let api = tokio::spawn(harness::api::serve(
        listener,
        router(state),
        limits,
        stop.clone().cancelled_owned(),
    ));
    let served = tokio::spawn(async move {
        h.serve(async {
            let _ = rx.await;
        })
        .await
        .unwrap();
        stop.cancel();
        let _ = api.await;
    });
    Api {
        base,
        client: reqwest::Client::new(),
        stop: Some(tx),
        served: Some(served),
        replica,
    }
}

async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn wait_status(api: &Api, id: i64, want: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let (_, t) = json_of(api.get(&format!("/api/tasks/{id}")).send().await.unwrap()).await;
        if t["status"] == want {
            return t;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "task {id} is {}, not {want}",
            t["status"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn task_endpoints_follow_the_documented_contract() {
    let db = TestDb::new().await;
    let flaky = Arc::new(AtomicBool::new(true));
    let api = start(&db, flaky.clone()).await;

    // Create: 201 new, 200 existing (header or field key).
    let (s, t) = json_of(
        api.post("/api/tasks")
            .header("Idempotency-Key", "k1")
            .json(&json!({"kind": "echo", "payload": {"v": 1}, "priority": 3}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    // Every documented field, with the value this request gives it.
    let id = t["id"].as_i64().unwrap();
    let mut expected = json!({
        "id": id, "agent_id": null, "kind": "echo", "status": "pending",
        "payload": {"v": 1}, "result": null, "error": null, "priority": 3, "attempt": 0,
        "retry_count": 0, "max_retries": 0, "idempotency_key": "k1", "started_at": null,
        "completed_at": null, "replica": null, "attempts": [], "cancel_requested": false,
        "fire_at": null, "timeout_ms": null, "progress": null, "queue": "default",
        "concurrency_key": null,
    });
    // The replica may have claimed it before the answer was read.
    if t["status"] == "running" {
        expected["status"] = json!("running");
        expected["attempt"] = json!(1);
        expected["replica"] = json!(api.replica);
        expected["started_at"] = t["started_at"].clone();
        assert!(t["started_at"].is_string(), "{t}");
    }
    for time in ["scheduled_at", "created_at"] {
        let at = t[time].as_str().unwrap_or_else(|| panic!("{time}: {t}"));
        chrono::DateTime::parse_from_rfc3339(at).unwrap_or_else(|e| panic!("{time}: {e}"));
        expected[time] = t[time].clone();
    }
    expected["traceparent"] = t["traceparent"].clone();
    assert_eq!(t, expected);
    // The same request again: the existing task, 200.
    let (s, again) = json_of(
        api.post("/api/tasks")
            .json(&json!({"kind": "echo", "payload": {"v": 1}, "idempotency_key": "k1"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, again["id"].as_i64()), (StatusCode::OK, Some(id)));
    // The same key for another request: 409 naming the task that holds the key.
    let (s, clash) = json_of(
        api.post("/api/tasks")
            .json(&json!({"kind": "echo", "payload": {"v": 2}, "idempotency_key": "k1"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, clash["detail"]["id"].as_i64()),
        (StatusCode::CONFLICT, Some(id)),
        "{clash}"
    );
    // The header wins over the field; it must be printable ASCII.
    let (s, by_header) = json_of(
        api.post("/api/tasks")
            .header("idempotency-key", "k1")
            .json(&json!({"kind": "echo", "payload": {"v": 1}, "idempotency_key": "other"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, by_header["id"].as_i64()), (StatusCode::OK, Some(id)));
    let r = api
        .post("/api/tasks")
        .header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes(b"k\xe9y").unwrap(),
        )
        .json(&json!({"kind": "echo", "payload": {}}))
        .send()
        .await
        .unwrap();
    let (s, e) = json_of(r).await;
    assert_eq!(
        (s, e["detail"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("Idempotency-Key")),
        "{e}"
    );
    let done = wait_status(&api, id, "completed").await;
    assert_eq!(done["result"], json!({"v": 1}));
    assert!(chrono::DateTime::parse_from_rfc3339(done["completed_at"].as_str().unwrap()).is_ok());

    // 404, listing with filters, pagination bounds.
    assert_eq!(
        api.get("/api/tasks/999999").send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let (s, list) = json_of(
        api.get("/api/tasks?status=completed&kind=echo&limit=10")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    for bad in ["limit=0", "limit=101", "offset=-1", "status=bogus"] {
        let (s, e) = json_of(api.get(&format!("/api/tasks?{bad}")).send().await.unwrap()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {e}");
        assert!(e["error"].as_str().unwrap().starts_with("invalid "), "{e}");
    }

    // Retry: only failed or timed-out tasks, and the new task completes.
    let (_, f) = json_of(
        api.post("/api/tasks")
            .json(&json!({"kind": "flaky"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let fid = f["id"].as_i64().unwrap();
    wait_status(&api, fid, "failed").await;
    let (s, _) = json_of(
        api.post(&format!("/api/tasks/{id}/retry"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "a completed task is not retried");
    flaky.store(false, Ordering::SeqCst);
    let (s, r) = json_of(
        api.post(&format!("/api/tasks/{fid}/retry"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    wait_status(&api, r["id"].as_i64().unwrap(), "completed").await;
    assert_eq!(
        api.post("/api/tasks/999999/retry")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    // Delete: refused while running, 204 otherwise, then 404.
    let (_, sl) = json_of(
        api.post("/api/tasks")
            .json(&json!({"kind": "sleep", "payload": {"ms": 3000}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let sid = sl["id"].as_i64().unwrap();
    wait_status(&api, sid, "running").await;
    assert_eq!(
        api.client
            .delete(api.url(&format!("/api/tasks/{sid}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::CONFLICT
    );
    let (s, c) = json_of(
        api.post(&format!("/api/tasks/{sid}/cancel"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, &c["status"]), (StatusCode::OK, &json!("running")));
    wait_status(&api, sid, "cancelled").await;
    assert_eq!(
        api.client
            .delete(api.url(&format!("/api/tasks/{sid}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.get(&format!("/api/tasks/{sid}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    // Summary: each status's count as the table has it, and the success rate from them.
    let (s, sum) = json_of(api.get("/api/tasks/stats/summary").send().await.unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM tasks GROUP BY status")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let count = |status: &str| counts.iter().find(|c| c.0 == status).map_or(0, |c| c.1);
    for status in Status::ALL.map(Status::as_str) {
        assert_eq!(sum[status], count(status), "{status}: {sum}");
    }
    assert_eq!(sum["total"], counts.iter().map(|c| c.1).sum::<i64>());
    assert_eq!(sum["completed"], 2);
    let finished = count("completed") + count("failed") + count("timeout");
    let rate = sum["success_rate"].as_f64().unwrap();
    assert!(
        // Rounded to one decimal.
        (rate - 100.0 * count("completed") as f64 / finished as f64).abs() <= 0.05,
        "{sum}"
    );
    api.stop().await;
}

#[tokio::test]
async fn auth_scopes_and_bad_requests_get_clear_json_errors() {
    let db = TestDb::new().await;
    let api = start(&db, Arc::new(AtomicBool::new(false))).await;
    let c = &api.client;

    let r = c.get(api.url("/api/tasks")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        r.headers()
            .get("www-authenticate")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(
        c.get(api.url("/api/tasks"))
            .bearer_auth("wrong-token-0123456789")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        c.get(api.url("/api/tasks"))
            .bearer_auth(READ)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let (s, e) = json_of(
        c.post(api.url("/api/tasks"))
            .bearer_auth(READ)
            .json(&json!({"kind": "noop"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    // Health and metrics stay open.
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            c.get(api.url(open)).send().await.unwrap().status(),
            StatusCode::OK,
            "{open}"
        );
    }

    let post = |body: &'static str| {
        c.post(api.url("/api/tasks"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/json")
            .body(body)
    };
    let (s, e) = json_of(post("{not json").send().await.unwrap()).await;
    assert_eq!(
        (s, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("malformed JSON"))
    );
    let (s, e) = json_of(post(r#"{"payload": {}}"#).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(e["detail"]["field"], "kind", "{e}");
    assert_eq!(e["error"], "invalid kind: is required", "{e}");
    let (s, e) = json_of(
        post(r#"{"kind": "noop", "priority": "high"}"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(e["detail"]["field"], "priority", "{e}");
    assert_eq!(
        e["detail"]["reason"], "must be a whole number, not a string",
        "{e}"
    );
    let (s, e) = json_of(post(r#"{"kind": "nope"}"#).send().await.unwrap()).await;
    assert_eq!(
        (s, e["detail"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("kind"))
    );
    let big = format!(
        r#"{{"kind": "noop", "payload": "{}"}}"#,
        "x".repeat(8 * 1024)
    );
    let r = c
        .post(api.url("/api/tasks"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (s, e) = json_of(
        c.get(api.url("/api/nowhere"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("no such route"))
    );
    let (s, e) = json_of(
        c.put(api.url("/api/tasks"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{e}");
    assert!(e["error"].is_string());
    // Nothing of the above was stored.
    let (_, sum) = json_of(api.get("/api/tasks/stats/summary").send().await.unwrap()).await;
    assert_eq!(sum["total"], 0);
    api.stop().await;
}

#[tokio::test]
async fn an_agents_own_config_is_apart_from_its_settings_and_the_old_spelling_is_deprecated() {
    let db = TestDb::new().await;
    let api = start(&db, Arc::new(AtomicBool::new(false))).await;
    let code = "class Agent:\n    def __init__(self, config):\n        self.c = config\n    def execute(self):\n        return {'name': self.c.get('name')}\n";
    // The issue's request: an agent's own config, which used to be refused.
    let r = api
        .post("/api/agents")
        .json(
            &json!({"name": "ada", "code": code, "config": {"name": "Ada"},
                      "settings": {"timeout": 30}}),
        )
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("deprecation").is_none());
    let (s, a) = json_of(r).await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    assert_eq!(a["config"], json!({"name": "Ada"}));
    assert_eq!(a["settings"]["timeout"], 30);
    // Config alone, with a key that is no setting: the agent's own.
    let (s, b) = json_of(
        api.post("/api/agents")
            .json(&json!({"name": "bea", "code": code, "config": {"name": "Bea", "timeout": 5}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["config"], json!({"name": "Bea", "timeout": 5}));
    // The spelling that shipped: settings fields under `config` still work, and say they
    // are deprecated.
    let r = api
        .post("/api/agents")
        .json(&json!({"name": "old", "code": code, "config": {"timeout": 20}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["deprecation"], "true");
    assert!(
        r.headers()["warning"]
            .to_str()
            .unwrap()
            .contains("send them as settings")
    );
    let (s, o) = json_of(r).await;
    assert_eq!(s, StatusCode::CREATED, "{o}");
    assert_eq!(
        (o["settings"]["timeout"].clone(), o["config"].clone()),
        (json!(20), json!({}))
    );
    // A bad setting names its field under the name the caller used.
    for (body, field) in [
        (json!({"settings": {"timeout": 0}}), "settings.timeout"),
        (json!({"config": {"overlap": "never"}}), "config.overlap"),
    ] {
        let (s, e) = json_of(
            api.client
                .patch(api.url("/api/agents/ada"))
                .bearer_auth(ADMIN)
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
        assert_eq!(e["detail"]["field"], field, "{e}");
    }
    // PATCH replaces the config, and runs get it.
    let (s, p) = json_of(
        api.client
            .patch(api.url("/api/agents/ada"))
            .bearer_auth(ADMIN)
            .json(&json!({"config": {"name": "Grace"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, &p["config"]),
        (StatusCode::OK, &json!({"name": "Grace"})),
        "{p}"
    );
    let (s, t) = json_of(api.post("/api/agents/ada/run").send().await.unwrap()).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let done = wait_status(&api, t["id"].as_i64().unwrap(), "completed").await;
    assert_eq!(done["result"]["result"], json!({"name": "Grace"}), "{done}");
    // A config PostgreSQL cannot store, or over its bound, is refused.
    let big = "x".repeat(harness::bounds::AGENT_CONFIG_BYTES);
    for config in [json!({"k": "\u{0}"}), json!({"big": big})] {
        let (s, e) = json_of(
            api.client
                .patch(api.url("/api/agents/ada"))
                .bearer_auth(ADMIN)
                .json(&json!({"config": config}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert!(s.is_client_error(), "{s} {e}");
    }
    // A payload the kind can never run is refused at enqueue, naming the payload.
    let (s, e) = json_of(
        api.post("/api/tasks")
            .json(&json!({"kind": "sleep", "payload": {"ms": "abc"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["detail"]["field"], "payload", "{e}");
    assert!(e["error"].as_str().unwrap().contains("payload.ms"), "{e}");
    // An agent task by hand is its agent's run; one naming no agent is taken as before (its
    // run ends cancelled, saying the agent does not exist), never a 500.
    let ada = a["id"].as_i64().unwrap();
    for (agent_id, want) in [(ada, json!(ada)), (-1591, Value::Null)] {
        let (s, t) = json_of(
            api.post("/api/tasks")
                .json(&json!({"kind": "agent", "payload": {"agent_id": agent_id}, "delay_s": 3600}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{t}");
        assert_eq!(t["agent_id"], want, "{t}");
    }
    api.stop().await;
}

#[tokio::test]
async fn agent_and_fleet_endpoints() {
    let db = TestDb::new().await;
    let api = start(&db, Arc::new(AtomicBool::new(false))).await;
    let code = "class Agent:\n    def execute(self):\n        prev = (self.handoff or {}).get('state') or {}\n        return {'state': {'n': prev.get('n', 0) + 1}}\n";
    let (s, a) = json_of(api.post("/api/agents").json(&json!({"name": "counter", "code": code, "config": {"timeout": 30, "schedule": "0 * * * *"}})).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    let id = a["id"].as_i64().unwrap();
    let (s, _) = json_of(
        api.post("/api/agents")
            .json(&json!({"name": "counter", "code": code}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, e) = json_of(
        api.post("/api/agents")
            .json(&json!({"name": "bad", "code": "class Agent(:"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["detail"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("code")),
        "{e}"
    );
    let (s, e) = json_of(
        api.post("/api/agents")
            .json(&json!({"name": "bad", "code": code, "config": {"memory_mb": 1}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["detail"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("config.memory_mb")),
        "{e}"
    );
    let (s, e) = json_of(
        api.post("/api/agents")
            .json(&json!({"name": "bad", "code": code, "config": {"schedule": "nope"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["detail"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("config.schedule")),
        "{e}"
    );

    let (_, list) = json_of(api.get("/api/agents").send().await.unwrap()).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (_, by_name) = json_of(api.get("/api/agents/counter").send().await.unwrap()).await;
    assert_eq!(by_name["id"].as_i64(), Some(id));
    // An agent's JSON is flat: the runtime kind beside its code, no argv.
    assert_eq!(by_name["runtime"], "python");
    assert!(by_name["code"].is_string(), "{by_name}");
    assert_eq!(by_name["command"], Value::Null);
    assert!(by_name["next_fire_at"].is_string());
    let (s, p) = json_of(
        api.client
            .patch(api.url(&format!("/api/agents/{id}")))
            .bearer_auth(ADMIN)
            .json(&json!({"config": {"timeout": 20}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, &p["settings"]["timeout"]),
        (StatusCode::OK, &json!(20)),
        "{p}"
    );

    let (s, h) = json_of(
        api.get(&format!("/api/agents/{id}/handoff"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "no handoff before the first run: {h}"
    );
    for n in 1..=2 {
        let (s, t) = json_of(
            api.post(&format!("/api/agents/{id}/run"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{t}");
        wait_status(&api, t["id"].as_i64().unwrap(), "completed").await;
        let (_, h) = json_of(
            api.get(&format!("/api/agents/{id}/handoff"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(h["state"]["n"], n);
    }
    let (_, runs) = json_of(
        api.get(&format!("/api/tasks/agent/{id}?limit=1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(runs.as_array().unwrap().len(), 1, "limit applies");
    assert_eq!(
        api.client
            .delete(api.url(&format!("/api/agents/{id}/handoff")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.client
            .delete(api.url(&format!("/api/agents/{id}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.get(&format!("/api/agents/{id}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    // Fleet.
    let t0 = Instant::now();
    loop {
        let (_, f) = json_of(api.get("/api/fleet").send().await.unwrap()).await;
        if f["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == api.replica.as_str())
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{f}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        api.post(&format!("/api/fleet/{}/resume", api.replica))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        api.post("/api/fleet/nobody-here/resume")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.post("/api/fleet/resume").send().await.unwrap().status(),
        StatusCode::OK
    );
    api.stop().await;
}

/// The governor state `GET /api/fleet` shows for the test's replica.
async fn governor_state_of(api: &Api) -> String {
    let (_, f) = json_of(api.get("/api/fleet").send().await.unwrap()).await;
    f["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == api.replica.as_str())
        .and_then(|r| r["governor_state"].as_str())
        .unwrap_or("?")
        .to_string()
}

#[tokio::test]
async fn a_holding_replica_is_resumed_through_the_api() {
    let db = TestDb::new().await;
    let flaky = Arc::new(AtomicBool::new(true));
    // One failure is a burst, and one burst asks for a person.
    let api = start_with(
        &db,
        flaky.clone(),
        &[
            (
                "HARNESS_GOVERNANCE__PAUSE_AFTER_ERROR_BURST__THRESHOLD",
                "1",
            ),
            ("HARNESS_GOVERNANCE__HUMAN_REVIEW_AFTER_PAUSE_BURSTS", "1"),
            // The replica's own hold: one kind's burst would quarantine the kind instead.
            (
                "HARNESS_GOVERNANCE__PAUSE_AFTER_ERROR_BURST__QUARANTINE_SHARE",
                "0",
            ),
        ],
    )
    .await;
    let (s, _) = json_of(
        api.post("/api/tasks")
            .json(&json!({"kind": "flaky", "payload": {}, "max_retries": 0}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    common::eventually("the replica to hold", Duration::from_secs(30), async || {
        (governor_state_of(&api).await == "holding").then_some(())
    })
    .await;
    // Held: new work waits.
    flaky.store(false, Ordering::SeqCst);
    let (_, waiting) = json_of(
        api.post("/api/tasks")
            .json(&json!({"kind": "flaky", "payload": {}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let wid = waiting["id"].as_i64().unwrap();
    // A read token may look but not resume.
    let read = api
        .client
        .post(api.url(&format!("/api/fleet/{}/resume", api.replica)))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::FORBIDDEN);
    assert_eq!(governor_state_of(&api).await, "holding");
    assert_eq!(
        api.post(&format!("/api/fleet/{}/resume", api.replica))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    common::eventually(
        "the replica to resume",
        Duration::from_secs(30),
        async || (governor_state_of(&api).await != "holding").then_some(()),
    )
    .await;
    let t = wait_status(&api, wid, "completed").await;
    assert_eq!(t["result"], json!({"ok": true}));
    api.stop().await;
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_metrics_move() {
    let db = TestDb::new().await;
    let api = start(&db, Arc::new(AtomicBool::new(false))).await;
    let (s, doc) = json_of(api.get("/api/openapi.json").send().await.unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    let mut ops = 0;
    for (path, methods) in paths {
        for (method, _) in methods.as_object().unwrap() {
            ops += 1;
            // Every documented operation is routed: never "no such route" or 405.
            let concrete = path
                .replace("{task_id}", "999999")
                .replace("{agent_id}", "999999")
                .replace("{id}", "999999")
                .replace("{replica_id}", "nobody");
            let r = api
                .client
                .request(method.to_uppercase().parse().unwrap(), api.url(&concrete))
                .bearer_auth(ADMIN)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            assert_ne!(
                r.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert_ne!(body["error"], "no such route", "{method} {path}");
        }
    }
    assert!(ops >= 23, "only {ops} operations documented");
    for required in [
        "/api/tasks/{task_id}",
        "/api/tasks/agent/{agent_id}",
        "/api/tasks/{task_id}/retry",
        "/api/tasks/stats/summary",
        "/api/agents/{id}/handoff",
        "/api/fleet/{replica_id}/resume",
        "/readyz",
        "/metrics",
    ] {
        assert!(paths.contains_key(required), "{required} missing");
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    assert!(
        schemas.contains_key("Task")
            && schemas.contains_key("Agent")
            && schemas.contains_key("CreateTask")
    );

    let counter = |text: &str, name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains("kind=\"echo\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = api
        .client
        .get(api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for i in 0..3 {
        let (_, t) = json_of(
            api.post("/api/tasks")
                .json(&json!({"kind": "echo", "payload": {"i": i}}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        wait_status(&api, t["id"].as_i64().unwrap(), "completed").await;
    }
    let after = api
        .client
        .get(api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "harness_tasks_enqueued_total",
        "harness_tasks_completed_total",
        "harness_task_duration_seconds_count",
        "harness_task_pickup_latency_seconds_count",
    ] {
        let (b, a) = (counter(&before, name), counter(&after, name));
        assert!(a >= b + 3.0, "{name}: {b} -> {a}\n{after}");
    }
    api.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_database() {
    let mut pg = common::RestartableServer::start("ready").await;
    let pool = harness::db::connect(&pg.url("ready"), 2).await.unwrap();
    let cfg = Config::load_from(None, [("DATABASE_URL".to_string(), pg.url("ready"))]).unwrap();
    let state = Arc::new(ApiState {
        queue: harness::queue::Queue::new(pool.clone(), 0),
        agents: None,
        pool: pool.clone(),
        tokens: vec![],
        registry: Default::default(),
        config: cfg,
        draining: tokio_util::sync::CancellationToken::new(),
    });
    let (api, stop) = serve_state(state).await;
    let base = format!("{api}/readyz");
    let client = reqwest::Client::new();
    assert_eq!(
        client.get(&base).send().await.unwrap().status(),
        StatusCode::OK
    );

    pg.down().await;
    let t0 = Instant::now();
    let r = client.get(&base).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "readiness took {:?}",
        t0.elapsed()
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    // The API's answer while the database is out of reach: 503, retry.
    let r = client
        .get(format!("{api}/api/tasks/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");

    pg.up().await;
    let t0 = Instant::now();
    loop {
        if client.get(&base).send().await.unwrap().status() == StatusCode::OK {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "not ready again after PostgreSQL came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    pool.close().await;
    pg.down().await;
}

#[tokio::test]
async fn a_nul_anywhere_in_a_request_is_a_422_naming_the_field() {
    let db = TestDb::new().await;
    let api = start(&db, Arc::new(AtomicBool::new(false))).await;
    let agent = api
        .post("/api/agents")
        .json(&json!({"name": "plain", "command": ["true"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(agent.status(), StatusCode::CREATED);

    let bodies: Vec<(&str, &str, Value, &str)> = vec![
        (
            "POST",
            "/api/tasks",
            json!({"kind": "echo", "payload": {"s": "a\u{0}b"}}),
            "payload",
        ),
        (
            "POST",
            "/api/tasks",
            json!({"kind": "echo", "payload": {"k\u{0}": 1}}),
            "payload",
        ),
        ("POST", "/api/tasks", json!({"kind": "echo\u{0}"}), "kind"),
        (
            "POST",
            "/api/tasks",
            json!({"kind": "echo", "idempotency_key": "k\u{0}"}),
            "idempotency_key",
        ),
        (
            "POST",
            "/api/agents",
            json!({"name": "n", "code": "class Agent:\n  pass\n\u{0}"}),
            "code",
        ),
        (
            "POST",
            "/api/agents",
            json!({"name": "n", "command": ["echo", "a\u{0}"]}),
            "command",
        ),
        (
            "POST",
            "/api/agents",
            json!({"name": "n", "command": ["true"], "config": {"env": {"K": "\u{0}"}}}),
            "env",
        ),
        (
            "PATCH",
            "/api/agents/plain",
            json!({"config": {"env": {"K\u{0}": "v"}}}),
            "env",
        ),
        (
            "POST",
            "/api/agents/plain/run",
            json!({"input": {"x": "\u{0}"}}),
            "input",
        ),
    ];
    for (method, path, body, field) in bodies {
        let r = api
            .client
            .request(method.parse().unwrap(), api.url(path))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let (s, v) = json_of(r).await;
        assert_eq!(
            s,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{method} {path} {body}: {v}"
        );
        assert!(
            v["error"].as_str().unwrap().contains(field),
            "{method} {path} {body}: the error names {field}: {v}"
        );
    }
    for (method, path) in [
        ("GET", "/api/agents/a%00b"),
        ("GET", "/api/tasks?kind=a%00b"),
        ("GET", "/api/tasks?status=a%00b"),
        ("POST", "/api/agents/a%00b/run"),
        ("DELETE", "/api/agents/a%00b"),
        ("POST", "/api/fleet/a%00b/resume"),
    ] {
        let r = api
            .client
            .request(method.parse().unwrap(), api.url(path))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        let (s, v) = json_of(r).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{method} {path}: {v}");
    }
    // Nothing was stored by any of them.
    let (_, tasks) = json_of(api.get("/api/tasks").send().await.unwrap()).await;
    assert_eq!(tasks.as_array().unwrap().len(), 0, "{tasks}");
    api.stop().await;
}

/// Raises this process's open-file limit as far as allowed; returns the new soft limit.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).unwrap().0
}

#[tokio::test]
async fn thousands_of_stalled_connections_and_half_sent_bodies_leave_health_and_api_answering() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new().await;
    let api = start_with(
        &db,
        Arc::new(AtomicBool::new(false)),
        &[
            ("HARNESS_API__MAX_CONNECTIONS", "500"),
            ("HARNESS_API__HEADER_TIMEOUT_S", "3"),
            ("HARNESS_API__BODY_TIMEOUT_S", "3"),
        ],
    )
    .await;
    let addr = api.base.trim_start_matches("http://").to_string();
    // Both ends live in this process: two descriptors per connection.
    let room = (raise_nofile().saturating_sub(400) / 2) as usize;
    let (stalled_n, partial_n) = (2000.min(room * 4 / 5), 300.min(room / 5));
    let mut held = Vec::new();
    for i in 0..stalled_n + partial_n {
        let Ok(mut sock) = tokio::net::TcpStream::connect(&addr).await else {
            continue;
        };
        let bytes = if i < stalled_n {
            // Half a request head, never finished.
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec()
        } else {
            // A whole head, and 10 bytes of a 1000-byte body.
            format!(
                "POST /api/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"kind\": \"e"
            )
            .into_bytes()
        };
        let _ = sock.write_all(&bytes).await;
        held.push(sock);
    }
    eprintln!(
        "{} stalled connections and {} half-sent bodies",
        stalled_n, partial_n
    );

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for (path, token) in [
        ("/healthz", None),
        ("/readyz", None),
        ("/api/tasks/stats/summary", Some(ADMIN)),
    ] {
        let t0 = Instant::now();
        let mut req = client.get(api.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let took = t0.elapsed();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert!(took < Duration::from_secs(1), "{path} took {took:?}");
        eprintln!("{path} answered in {took:?}");
    }

    // The half-sent body is answered 408, as JSON, once api.body_timeout_s has passed.
    let mut partial = tokio::net::TcpStream::connect(&addr).await.unwrap();
    partial
        .write_all(
            format!(
                "POST /api/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(8), partial.read(&mut answer))
        .await
        .expect("an answer within the body timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("api.body_timeout_s") && answer.contains("\"error\""),
        "{answer}"
    );

    // A head that never ends is cut off after api.header_timeout_s.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(8), slow.read(&mut buf))
        .await
        .expect("closed within the header timeout");
    assert!(matches!(closed, Ok(0) | Err(_)) || buf.starts_with(b"HTTP/1.1 408"));
    drop(held);
    api.stop().await;
}

#[tokio::test]
async fn env_values_are_shown_to_admins_on_one_object_and_to_nobody_in_lists() {
    let db = TestDb::new().await;
    let api = start(&db, Arc::new(AtomicBool::new(false))).await;
    let secret = "sk-live-0123456789abcdef";
    let (s, created) = json_of(
        api.post("/api/agents")
            .json(&json!({"name": "keyed", "command": ["true"], "config": {"env": {"API_KEY": secret}}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(
        created["settings"]["env"]["API_KEY"], secret,
        "the admin who set it sees it"
    );
    let (s, task) = json_of(
        api.post("/api/tasks")
            .json(&json!({"kind": "command", "payload": {"argv": ["true"], "env": {"TOKEN": secret}}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{task}");
    let id = task["id"].as_i64().unwrap();

    let read = |path: &str| api.client.get(api.url(path)).bearer_auth(READ);
    for path in [
        "/api/agents".to_string(),
        "/api/agents/keyed".to_string(),
        "/api/tasks".to_string(),
        format!("/api/tasks/{id}"),
    ] {
        let (s, v) = json_of(read(&path).send().await.unwrap()).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        let text = v.to_string();
        assert!(
            !text.contains(secret),
            "a read token saw the secret at {path}: {text}"
        );
        assert!(
            text.contains("API_KEY") || text.contains("TOKEN"),
            "the names stay visible at {path}: {text}"
        );
        assert!(text.contains("[redacted]"), "{path}: {text}");
    }
    // Admins: on the one object, not in lists.
    let (_, one) = json_of(api.get("/api/agents/keyed").send().await.unwrap()).await;
    assert_eq!(one["settings"]["env"]["API_KEY"], secret);
    let (_, one) = json_of(api.get(&format!("/api/tasks/{id}")).send().await.unwrap()).await;
    assert_eq!(one["payload"]["env"]["TOKEN"], secret);
    for path in ["/api/agents", "/api/tasks"] {
        let (_, v) = json_of(api.get(path).send().await.unwrap()).await;
        assert!(!v.to_string().contains(secret), "{path}: {v}");
    }
    // An agent's own config: a reader sees its secret-looking values redacted, an admin all.
    let (s, created) = json_of(
        api.post("/api/agents")
            .json(&json!({"name": "configured", "command": ["true"],
                          "config": {"webhook_token": secret, "region": "eu"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let (_, v) = json_of(read("/api/agents/configured").send().await.unwrap()).await;
    assert_eq!(
        v["config"],
        json!({"webhook_token": "[redacted]", "region": "eu"})
    );
    let (_, v) = json_of(api.get("/api/agents/configured").send().await.unwrap()).await;
    assert_eq!(v["config"]["webhook_token"], secret);
    api.stop().await;
}

#[tokio::test]
async fn metrics_can_require_a_token() {
    let db = TestDb::new().await;
    let api = start_with(
        &db,
        Arc::new(AtomicBool::new(false)),
        &[("HARNESS_API__METRICS_AUTH", "true")],
    )
    .await;
    let c = &api.client;
    assert_eq!(
        c.get(api.url("/metrics")).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let r = c
        .get(api.url("/metrics"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    // Health stays open for the orchestrator.
    assert_eq!(
        c.get(api.url("/healthz")).send().await.unwrap().status(),
        StatusCode::OK
    );
    api.stop().await;
}

#[tokio::test]
async fn hostile_requests_get_documented_json_errors() {
    let db = TestDb::new().await;
    let api = start(&db, Arc::new(AtomicBool::new(false))).await;
    let (s, _) = json_of(
        api.post("/api/agents")
            .json(&json!({"name": "plain", "command": ["true"]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let big = format!(r#"{{"input": "{}"}}"#, "x".repeat(8 * 1024));
    let admin = format!("Bearer {ADMIN}");
    let lower = format!("bearer {ADMIN}");
    // (method, path, authorization, content type, body, status, field named in detail.field)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        String,
        u16,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            "GET",
            "/api/tasks/abc",
            Some(&admin),
            None,
            String::new(),
            422,
            Some("task_id"),
        ),
        (
            "GET",
            "/api/tasks/99999999999999999999",
            Some(&admin),
            None,
            String::new(),
            422,
            Some("task_id"),
        ),
        (
            "GET",
            "/api/tasks?limit=abc",
            Some(&admin),
            None,
            String::new(),
            422,
            Some("limit"),
        ),
        (
            "GET",
            "/api/tasks?limit=0",
            Some(&admin),
            None,
            String::new(),
            422,
            Some("limit"),
        ),
        (
            "GET",
            "/api/tasks?offset=-1",
            Some(&admin),
            None,
            String::new(),
            422,
            Some("offset"),
        ),
        (
            "GET",
            "/api/tasks?status=bogus",
            Some(&admin),
            None,
            String::new(),
            422,
            Some("status"),
        ),
        (
            "GET",
            "/api/tasks?agent_id=x",
            Some(&admin),
            None,
            String::new(),
            422,
            Some("agent_id"),
        ),
        (
            "GET",
            "/api/tasks/agent/xyz",
            Some(&admin),
            None,
            String::new(),
            422,
            Some("agent_id"),
        ),
        (
            "POST",
            "/api/tasks/abc/retry",
            Some(&admin),
            None,
            String::new(),
            422,
            Some("task_id"),
        ),
        (
            "POST",
            "/api/tasks/abc/cancel",
            Some(&admin),
            None,
            String::new(),
            422,
            Some("task_id"),
        ),
        (
            "DELETE",
            "/api/tasks/1.5",
            Some(&admin),
            None,
            String::new(),
            422,
            Some("task_id"),
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("text/plain"),
            "{}".into(),
            415,
            None,
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("application/json"),
            "{".into(),
            400,
            None,
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("application/json"),
            r#"{"kind":"echo"} {}"#.into(),
            400,
            None,
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("application/json"),
            "{}".into(),
            422,
            Some("kind"),
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("application/json"),
            r#"{"kind":"echo","extra":1}"#.into(),
            422,
            Some("extra"),
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("application/json"),
            r#"{"kind":"echo","priority":1.5}"#.into(),
            422,
            Some("priority"),
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("application/json"),
            r#"{"kind":"echo","delay_s":-1}"#.into(),
            422,
            Some("delay_s"),
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("application/json"),
            r#"{"kind":"echo","timeout_s":0}"#.into(),
            422,
            Some("timeout_s"),
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("application/json"),
            r#"{"kind":"echo","max_retries":-1}"#.into(),
            422,
            Some("max_retries"),
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("application/json"),
            r#"{"kind":"echo","run_at":"tomorrow"}"#.into(),
            422,
            Some("run_at"),
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("application/json"),
            r#"{"kind":"nope"}"#.into(),
            422,
            Some("kind"),
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("application/json"),
            big.clone(),
            413,
            None,
        ),
        (
            "POST",
            "/api/agents/plain/run",
            Some(&admin),
            Some("application/json"),
            big.clone(),
            413,
            None,
        ),
        (
            "POST",
            "/api/agents/plain/run",
            Some(&admin),
            Some("application/json"),
            "[".into(),
            400,
            None,
        ),
        (
            "POST",
            "/api/agents/plain/run",
            Some(&admin),
            Some("application/json"),
            r#"{"inputs": 1}"#.into(),
            422,
            Some("inputs"),
        ),
        (
            "POST",
            "/api/agents",
            Some(&admin),
            Some("application/json"),
            r#"{"name":"bad name!","command":["true"]}"#.into(),
            422,
            Some("name"),
        ),
        (
            "POST",
            "/api/agents",
            Some(&admin),
            Some("application/json"),
            r#"{"name":"a","command":["true"],"config":{"overlap":"never"}}"#.into(),
            422,
            Some("config.overlap"),
        ),
        (
            "POST",
            "/api/agents",
            Some(&admin),
            Some("application/json"),
            r#"{"name":"a","code":"x","command":["true"]}"#.into(),
            422,
            Some("code"),
        ),
        (
            "POST",
            "/api/agents",
            Some(&admin),
            Some("application/json"),
            r#"{"name":"a","command":"true"}"#.into(),
            422,
            Some("command"),
        ),
        (
            "POST",
            "/api/tasks",
            Some(&admin),
            Some("application/json"),
            r#"{"kind":"echo","payload":{"x":[1.7976931348623157e308]}}"#.into(),
            422,
            Some("payload"),
        ),
        (
            "PATCH",
            "/api/agents/nope",
            Some(&admin),
            Some("application/json"),
            "{}".into(),
            404,
            None,
        ),
        (
            "GET",
            "/api/agents/%00",
            Some(&admin),
            None,
            String::new(),
            422,
            Some("path"),
        ),
        ("GET", "/api/tasks", None, None, String::new(), 401, None),
        (
            "GET",
            "/api/tasks",
            Some("Basic YWRtaW46YWRtaW4="),
            None,
            String::new(),
            401,
            None,
        ),
        (
            "GET",
            "/api/tasks",
            Some(&lower),
            None,
            String::new(),
            200,
            None,
        ),
        (
            "GET",
            "/api/fleet/x/resume",
            Some(&admin),
            None,
            String::new(),
            405,
            None,
        ),
        (
            "DELETE",
            "/api/tasks",
            Some(&admin),
            None,
            String::new(),
            405,
            None,
        ),
        ("GET", "/nowhere", None, None, String::new(), 404, None),
    ];
    for (method, path, auth, ctype, body, status, field) in cases {
        let mut req = api
            .client
            .request(method.parse().unwrap(), api.url(path))
            .body(body.clone());
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        let r = req.send().await.unwrap();
        let got = r.status().as_u16();
        let ctype_out = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = r.text().await.unwrap();
        let case = format!("{method} {path} {}", &body[..body.len().min(60)]);
        assert_eq!(got, status, "{case}: {text}");
        assert!(
            ctype_out.starts_with("application/json"),
            "{case}: {ctype_out} {text}"
        );
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: {e}: {text}"));
        if status >= 400 {
            assert!(
                v["error"].is_string() && v.get("detail").is_some(),
                "{case}: {v}"
            );
        }
        if let Some(f) = field {
            assert_eq!(v["detail"]["field"], f, "{case}: {v}");
            assert!(
                v["error"].as_str().unwrap().contains(f),
                "{case}: the message names {f}: {v}"
            );
        }
    }
    api.stop().await;
}

#[tokio::test]
async fn the_serve_binary_limits_requests_drains_them_on_shutdown_and_serves_only_health_without_api()
 {
    let db = TestDb::new().await;
    let free_port = || common::free_port();
    let port = free_port();
    let mut replica = common::Proc::spawn(
        common::harness_at(&db.url)
            .arg("serve")
            .env("HARNESS_API__BIND", format!("127.0.0.1:{port}"))
            .env("HARNESS_API__MAX_CONCURRENT_REQUESTS", "2")
            .env("HARNESS_API__REQUEST_TIMEOUT_S", "120")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    common::eventually("the API to answer", Duration::from_secs(30), async || {
        client.get(url("/healthz")).send().await.ok()?;
        Some(())
    })
    .await;

    // Stats requests wait while the tasks table is locked: two at a time are let in.
    let mut lock = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let requests: Vec<_> = (0..3)
        .map(|_| {
            let (client, u) = (client.clone(), url("/api/tasks/stats/summary"));
            tokio::spawn(async move { client.get(u).send().await.map(|r| r.status()) })
        })
        .collect();
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query ILIKE '%FROM tasks GROUP BY status%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    common::eventually("two requests in", Duration::from_secs(30), async || {
        (waiting().await == 2).then_some(())
    })
    .await;
    // The third waits for a place; health is answered meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(waiting().await, 2, "the limit lets two in");
    let health = client.get(url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    // Shutdown while they wait: every request already in is answered.
    replica.signal(nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.rollback().await.unwrap();
    for r in requests {
        assert_eq!(r.await.unwrap().unwrap(), StatusCode::OK);
    }
    let status = tokio::task::spawn_blocking(move || {
        let s = replica.wait_for_exit(Duration::from_secs(60));
        (s, replica)
    })
    .await
    .unwrap()
    .0
    .expect("the replica exits after draining");
    assert!(status.success(), "{status}");

    // --no-api: a worker that serves tasks, and on its port only health and metrics.
    let port = free_port();
    let _worker = common::Proc::spawn(
        common::harness_at(&db.url)
            .args(["serve", "--no-api"])
            .env("HARNESS_API__BIND", format!("127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let q = harness::queue::Queue::new(db.pool.clone(), 0);
    let id = q
        .enqueue(harness::queue::NewTask::new("noop", json!({})))
        .await
        .unwrap()
        .id;
    common::eventually("the task done", Duration::from_secs(30), async || {
        (q.get(id).await.unwrap().status == Status::Completed).then_some(())
    })
    .await;
    let base = format!("http://127.0.0.1:{port}");
    for (path, expected) in [
        ("/healthz", StatusCode::OK),
        ("/readyz", StatusCode::OK),
        ("/metrics", StatusCode::OK),
        ("/api/tasks", StatusCode::NOT_FOUND),
        ("/api/openapi.json", StatusCode::NOT_FOUND),
    ] {
        let r = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), expected, "--no-api {path}");
    }
}

/// A request that finds no pooled connection within the pool's wait is answered 503 with
/// `Retry-After`, not 500: the client may retry; nothing is written meanwhile.
#[tokio::test]
async fn a_busy_pool_answers_503_with_retry_after() {
    let db = TestDb::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(300))
        .connect(&db.url)
        .await
        .unwrap();
    let cfg = Config::load_from(None, [("DATABASE_URL".to_string(), db.url.clone())]).unwrap();
    let state = Arc::new(ApiState {
        queue: harness::queue::Queue::new(pool.clone(), 0),
        agents: None,
        pool: pool.clone(),
        tokens: vec![],
        registry: builtin_handlers(Harness::builder())
            .config(cfg.clone())
            .pool(db.pool.clone())
            .build()
            .await
            .unwrap()
            .registry(),
        config: cfg,
        draining: tokio_util::sync::CancellationToken::new(),
    });
    let (base, stop) = serve_state(state).await;
    let client = reqwest::Client::new();
    let held = pool.acquire().await.unwrap();
    for r in [
        client.get(format!("{base}/api/tasks/1")),
        client
            .post(format!("{base}/api/tasks"))
            .json(&json!({"kind": "echo", "payload": {}})),
    ] {
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "1");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("retry"), "{body}");
    }
    drop(held);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 0);
    let r = client
        .post(format!("{base}/api/tasks"))
        .json(&json!({"kind": "echo", "payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    stop.cancel();
}

/// Serves the API of `state` on a loopback port: its base URL, and what stops it.
async fn serve_state(state: Arc<ApiState>) -> (String, tokio_util::sync::CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let limits = harness::api::server::ServerLimits::from_config(&state.config.api);
    tokio::spawn(harness::api::serve(
        listener,
        router(state),
        limits,
        stop.clone().cancelled_owned(),
    ));
    (base, stop)
}

#[tokio::test]
async fn queue_endpoints_list_pause_and_resume_and_tasks_and_agents_name_their_queue() {
    let db = TestDb::new().await;
    let api = start(&db, Arc::new(AtomicBool::new(false))).await;
    // A task in a queue no replica serves waits there; the listing says so.
    let (s, t) = json_of(
        api.post("/api/tasks")
            .json(&json!({"kind": "echo", "payload": {}, "queue": "gpu"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    assert_eq!(t["queue"], "gpu");
    // An agent's runs wait in its queue, through its run endpoint and a plain agent task.
    let (s, a) = json_of(
        api.post("/api/agents")
            .json(&json!({"name": "q", "command": ["true"], "settings": {"queue": "gpu"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    assert_eq!(a["settings"]["queue"], "gpu");
    let (s, run) = json_of(api.post("/api/agents/q/run").send().await.unwrap()).await;
    assert_eq!(s, StatusCode::CREATED, "{run}");
    assert_eq!(run["queue"], "gpu");
    let (_, plain) = json_of(
        api.post("/api/tasks")
            .json(&json!({"kind": "agent", "payload": {"agent_id": a["id"]}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(plain["queue"], "gpu", "{plain}");
    let (s, list) = json_of(api.get("/api/queues").send().await.unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    let queues = list["queues"].as_array().unwrap();
    let gpu = queues.iter().find(|q| q["name"] == "gpu").unwrap();
    assert_eq!(gpu["runnable"], 3, "{list}");
    assert_eq!(gpu["served_by"], json!({}));
    assert_eq!(gpu["paused"], false);
    let default = queues.iter().find(|q| q["name"] == "default").unwrap();
    assert_eq!(default["served_by"][&api.replica], 8, "{list}");
    // Pause: admins only; a reason is kept; twice is not a change.
    let r = api
        .client
        .post(api.url("/api/queues/gpu/pause"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let (s, p) = json_of(
        api.post("/api/queues/gpu/pause")
            .json(&json!({"reason": "driver upgrade"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, p),
        (
            StatusCode::OK,
            json!({"name": "gpu", "paused": true, "changed": true})
        )
    );
    let (_, p) = json_of(api.post("/api/queues/gpu/pause").send().await.unwrap()).await;
    assert_eq!(p["changed"], false);
    let (_, list) = json_of(api.get("/api/queues").send().await.unwrap()).await;
    let gpu = list["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "gpu")
        .unwrap()
        .clone();
    assert_eq!(
        (gpu["paused"].clone(), gpu["reason"].clone()),
        (json!(true), json!(""))
    );
    let (s, r) = json_of(api.post("/api/queues/gpu/resume").send().await.unwrap()).await;
    assert_eq!(
        (s, r),
        (
            StatusCode::OK,
            json!({"name": "gpu", "paused": false, "changed": true})
        )
    );
    // Bad names and bodies name the field.
    for (path, body, field) in [
        ("/api/queues/a%20b/pause", json!({}), "queue"),
        ("/api/queues/gpu/pause", json!({"why": "x"}), "why"),
        ("/api/queues/gpu/pause", json!({"reason": 3}), "reason"),
    ] {
        let (s, e) = json_of(api.post(path).json(&body).send().await.unwrap()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{path} {body}: {e}");
        assert!(e.to_string().contains(field), "{path} {body}: {e}");
    }
    let (s, e) = json_of(
        api.post("/api/tasks")
            .json(&json!({"kind": "echo", "queue": "no spaces"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(e["detail"]["field"], "queue", "{e}");
    api.stop().await;
}

#[tokio::test]
async fn limit_endpoints_set_list_and_remove_limits_and_refuse_bad_ones_naming_the_field() {
    let db = TestDb::new().await;
    let api = start(&db, Arc::new(AtomicBool::new(false))).await;
    let (s, a) = json_of(
        api.post("/api/agents")
            .json(&json!({"name": "llm", "command": ["true"]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    let put = |path: &str| api.client.put(api.url(path)).bearer_auth(ADMIN);
    // An agent by name; a key limit for each key; a queue with both.
    let (s, l) = json_of(
        put("/api/limits/agent/llm")
            .json(&json!({"concurrency": 3}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{l}");
    assert_eq!(
        l,
        json!({"scope": "agent", "target": a["id"].to_string(), "concurrency": 3,
               "rate": null, "per_ms": null})
    );
    for (path, body) in [
        ("/api/limits/key/*", json!({"concurrency": 2})),
        (
            "/api/limits/queue/openai",
            json!({"concurrency": 10, "rate": "60/min"}),
        ),
    ] {
        let (s, l) = json_of(put(path).json(&body).send().await.unwrap()).await;
        assert_eq!(s, StatusCode::OK, "{path}: {l}");
    }
    let (s, list) = json_of(api.get("/api/limits").send().await.unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    let limits = list["limits"].as_array().unwrap();
    assert_eq!(limits.len(), 3, "{list}");
    let openai = limits.iter().find(|l| l["target"] == "openai").unwrap();
    assert_eq!(
        (openai["rate"].clone(), openai["per_ms"].clone()),
        (json!(60), json!(60_000))
    );
    assert_eq!(
        (openai["running"].clone(), openai["waiting"].clone()),
        (json!(0), json!(0))
    );
    // A task names its concurrency key.
    let (s, t) = json_of(
        api.post("/api/tasks")
            .json(&json!({"kind": "echo", "concurrency_key": "acme"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    assert_eq!(t["concurrency_key"], "acme");
    // Read tokens may look, not change.
    let r = api
        .client
        .put(api.url("/api/limits/kind/echo"))
        .bearer_auth(READ)
        .json(&json!({"concurrency": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    for (path, body, field) in [
        ("/api/limits/shelf/x", json!({"concurrency": 1}), "scope"),
        ("/api/limits/kind/echo", json!({}), "concurrency"),
        (
            "/api/limits/kind/echo",
            json!({"concurrency": 0}),
            "concurrency",
        ),
        (
            "/api/limits/kind/echo",
            json!({"concurrency": 3_000_000_000u64}),
            "concurrency",
        ),
        ("/api/limits/kind/echo", json!({"rate": "20"}), "rate"),
        ("/api/limits/kind/echo", json!({"rate": "0/s"}), "rate"),
        ("/api/limits/kind/echo", json!({"burst": 3}), "burst"),
        (
            "/api/limits/queue/a%20b",
            json!({"concurrency": 1}),
            "target",
        ),
    ] {
        let (s, e) = json_of(put(path).json(&body).send().await.unwrap()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{path} {body}: {e}");
        assert!(e.to_string().contains(field), "{path} {body}: {e}");
    }
    let (s, _) = json_of(
        put("/api/limits/agent/nobody")
            .json(&json!({"concurrency": 1}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let del = |path: &str| api.client.delete(api.url(path)).bearer_auth(ADMIN);
    assert_eq!(
        del("/api/limits/agent/llm").send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        del("/api/limits/agent/llm").send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let (_, list) = json_of(api.get("/api/limits").send().await.unwrap()).await;
    assert_eq!(list["limits"].as_array().unwrap().len(), 2);
    api.stop().await;
}
