//! The OpenAPI 3.1 document, generated from [`ROUTES`] and the JSON Schemas of the Rust
//! types (schemars). A test checks that every route here answers, so the table cannot drift
//! from the router.

use serde_json::{Map, Value, json};

/// One operation: method, path (OpenAPI form), summary, request body type, success status
/// and response type, and whether it changes anything (admin scope).
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub request: Option<&'static str>,
    pub status: u16,
    pub response: Option<&'static str>,
}

macro_rules! r {
    ($m:literal, $p:literal, $s:literal, $req:expr, $st:literal, $resp:expr) => {
        Route {
            method: $m,
            path: $p,
            summary: $s,
            request: $req,
            status: $st,
            response: $resp,
        }
    };
}

pub const ROUTES: &[Route] = &[
    r!("get", "/healthz", "The process is up", None, 200, None),
    r!(
        "get",
        "/readyz",
        "The database is reachable and migrated (503 within 2 s otherwise)",
        None,
        200,
        None
    ),
    r!(
        "get",
        "/metrics",
        "Prometheus text exposition",
        None,
        200,
        None
    ),
    r!("get", "/api/openapi.json", "This document", None, 200, None),
    r!(
        "get",
        "/api/tasks",
        "Tasks, newest first; filters status, kind, agent_id; limit 1..100, offset",
        None,
        200,
        Some("TaskList")
    ),
    r!(
        "post",
        "/api/tasks",
        "Enqueue a task (201 new, 200 existing for a known idempotency key)",
        Some("CreateTask"),
        201,
        Some("Task")
    ),
    r!(
        "get",
        "/api/tasks/stats/summary",
        "Counts and success rate",
        None,
        200,
        None
    ),
    r!(
        "get",
        "/api/tasks/agent/{agent_id}",
        "An agent's runs, newest first",
        None,
        200,
        Some("TaskList")
    ),
    r!(
        "get",
        "/api/tasks/{task_id}",
        "One task",
        None,
        200,
        Some("Task")
    ),
    r!(
        "delete",
        "/api/tasks/{task_id}",
        "Delete a task (400 while running)",
        None,
        204,
        None
    ),
    r!(
        "post",
        "/api/tasks/{task_id}/retry",
        "A new task from a failed or timed-out one (400 otherwise)",
        None,
        201,
        Some("Task")
    ),
    r!(
        "post",
        "/api/tasks/{task_id}/cancel",
        "Cancel a pending task, or abort a running one",
        None,
        200,
        None
    ),
    r!("get", "/api/agents", "Agents", None, 200, Some("AgentList")),
    r!(
        "post",
        "/api/agents",
        "Register an agent (validated like the CLI)",
        Some("CreateAgent"),
        201,
        Some("Agent")
    ),
    r!(
        "get",
        "/api/agents/{id}",
        "One agent, by id or name, with its next fire time",
        None,
        200,
        Some("Agent")
    ),
    r!(
        "patch",
        "/api/agents/{id}",
        "Change an agent",
        Some("UpdateAgent"),
        200,
        Some("Agent")
    ),
    r!(
        "delete",
        "/api/agents/{id}",
        "Remove an agent and its handoff",
        None,
        204,
        None
    ),
    r!(
        "post",
        "/api/agents/{id}/run",
        "Enqueue a run now",
        Some("RunAgent"),
        201,
        Some("Task")
    ),
    r!(
        "get",
        "/api/agents/{id}/handoff",
        "The state the next run receives (null before the first)",
        None,
        200,
        Some("HandoffArtifact")
    ),
    r!(
        "delete",
        "/api/agents/{id}/handoff",
        "Forget the handoff",
        None,
        204,
        None
    ),
    r!(
        "get",
        "/api/fleet",
        "Live replicas, the leader, governor states, latest metrics",
        None,
        200,
        None
    ),
    r!(
        "post",
        "/api/fleet/resume",
        "Lift every replica's hold",
        None,
        200,
        None
    ),
    r!(
        "post",
        "/api/fleet/{replica_id}/resume",
        "Lift one replica's hold",
        None,
        200,
        None
    ),
];

fn schemas() -> Map<String, Value> {
    let mut g = schemars::generate::SchemaSettings::openapi3().into_generator();
    g.subschema_for::<crate::queue::Task>();
    g.subschema_for::<super::CreateTask>();
    g.subschema_for::<crate::agents::Agent>();
    g.subschema_for::<super::CreateAgent>();
    g.subschema_for::<super::UpdateAgent>();
    g.subschema_for::<super::RunAgent>();
    g.subschema_for::<crate::agents::handoff::HandoffArtifact>();
    g.subschema_for::<crate::queue::replica::ReplicaRow>();
    let mut defs = g.take_definitions(true);
    defs.insert(
        "TaskList".into(),
        json!({"type": "array", "items": {"$ref": "#/components/schemas/Task"}}),
    );
    defs.insert(
        "AgentList".into(),
        json!({"type": "array", "items": {"$ref": "#/components/schemas/Agent"}}),
    );
    defs.insert(
        "Error".into(),
        json!({"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}, "detail": {}}}),
    );
    defs
}

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// The document, built anew on each call (it is small).
pub fn document() -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let mut op = json!({
            "summary": r.summary,
            "operationId": format!("{}{}", r.method, r.path.replace(['/', '{', '}', '.'], "_")),
            "responses": {},
        });
        let params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if let Some(req) = r.request {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": reference(req)}}});
        }
        let ok = match r.response {
            Some(resp) => {
                json!({"description": "success", "content": {"application/json": {"schema": reference(resp)}}})
            }
            None => json!({"description": "success"}),
        };
        op["responses"][r.status.to_string()] = ok;
        let error = json!({"description": "error", "content": {"application/json": {"schema": reference("Error")}}});
        op["responses"]["default"] = error;
        if r.path.starts_with("/api") {
            op["security"] = json!([{"bearer": []}]);
        }
        let entry = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        entry[r.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Agent Harness API", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}
