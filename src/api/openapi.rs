//! The OpenAPI 3.1 document of a replica, generated from [`ROUTES`], the JSON Schemas of the
//! response types (schemars) and request schemas written here from the same constants the
//! server checks, so the document states exactly what is accepted. The kinds a task may have
//! are the replica's own, so the document is built per replica. A test checks that every
//! route here answers, and CI runs schemathesis over the live document.

use serde_json::{Map, Value, json};

/// A parameter of an operation: its name, where it goes, its schema, and whether required.
pub struct Param {
    pub name: &'static str,
    pub location: &'static str,
    pub required: bool,
    pub schema: fn() -> Value,
    pub description: &'static str,
}

/// One operation of the API.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    /// Unique, snake_case: what generated clients call the function.
    pub operation_id: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub params: &'static [Param],
    /// Request body schema (JSON), and whether the body is required.
    pub request: Option<(&'static str, bool)>,
    /// Status, response schema (None: no body), description.
    pub responses: &'static [(u16, Option<&'static str>, &'static str)],
}

fn integer() -> Value {
    json!({"type": "integer", "format": "int64"})
}
fn boolean() -> Value {
    json!({"type": "boolean"})
}
fn cursor() -> Value {
    json!({"type": "string", "pattern": "^-?[0-9]{1,10}:-?[0-9]{1,10}$"})
}
fn text() -> Value {
    json!({"type": "string", "minLength": 1, "pattern": NO_NUL})
}
fn limit() -> Value {
    json!({"type": "integer", "minimum": 1, "maximum": 100, "default": 50})
}
fn offset() -> Value {
    json!({"type": "integer", "minimum": 0, "maximum": i64::MAX, "default": 0})
}
fn status() -> Value {
    json!({"$ref": "#/components/schemas/Status"})
}
fn any_text() -> Value {
    json!({"type": "string", "pattern": NO_NUL})
}
fn idempotency_header() -> Value {
    json!({
        "type": "string", "minLength": 1, "maxLength": crate::queue::MAX_KEY_LEN,
        "pattern": "^[\\x20-\\x7E]*$",
    })
}

/// No NUL character (PostgreSQL cannot store one; the API refuses it).
const NO_NUL: &str = "^[^\\u0000]*$";

const TASK_ID: Param = Param {
    name: "task_id",
    location: "path",
    required: true,
    schema: integer,
    description: "A task's id",
};
const FOLLOW: Param = Param {
    name: "follow",
    location: "query",
    required: false,
    schema: boolean,
    description: "Stream the output as Server-Sent Events (output, progress, then end) until \
                  the task ends",
};
const AFTER: Param = Param {
    name: "after",
    location: "query",
    required: false,
    schema: cursor,
    description: "Only output after this position (attempt:seq: a response's next, or an \
                  event's id; the Last-Event-ID header does the same)",
};
const AGENT_ID: Param = Param {
    name: "agent_id",
    location: "path",
    required: true,
    schema: integer,
    description: "An agent's numeric id",
};
const AGENT: Param = Param {
    name: "id",
    location: "path",
    required: true,
    schema: text,
    description: "An agent's numeric id or its name",
};
const REPLICA: Param = Param {
    name: "replica_id",
    location: "path",
    required: true,
    schema: text,
    description: "A replica's id (see GET /api/fleet)",
};
fn queue_param() -> Value {
    json!({"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"})
}
const QUEUE: Param = Param {
    name: "name",
    location: "path",
    required: true,
    schema: queue_param,
    description: "A queue's name (1 to 64 of letters, digits, _ - . :)",
};
fn limit_scope() -> Value {
    json!({"type": "string", "enum": crate::queue::limits::Scope::ALL.map(|s| s.as_str())})
}
const LIMIT_SCOPE: Param = Param {
    name: "scope",
    location: "path",
    required: true,
    schema: limit_scope,
    description: "What the limit applies to: queue, kind, agent or key",
};
fn limit_target() -> Value {
    // What every scope accepts; a key limit also takes `*` (each key on its own).
    json!({"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"})
}
const LIMIT_TARGET: Param = Param {
    name: "target",
    location: "path",
    required: true,
    schema: limit_target,
    description: "A queue's name, a kind, an agent's name or id, or a concurrency key; with scope \
                  key also * (each key on its own)",
};
const LIMIT: Param = Param {
    name: "limit",
    location: "query",
    required: false,
    schema: limit,
    description: "Page size, 1 to 100",
};
const OFFSET: Param = Param {
    name: "offset",
    location: "query",
    required: false,
    schema: offset,
    description: "Rows to skip",
};
const STATUS: Param = Param {
    name: "status",
    location: "query",
    required: false,
    schema: status,
    description: "Only tasks in this status",
};
const KIND: Param = Param {
    name: "kind",
    location: "query",
    required: false,
    schema: any_text,
    description: "Only tasks of this kind",
};
const AGENT_FILTER: Param = Param {
    name: "agent_id",
    location: "query",
    required: false,
    schema: integer,
    description: "Only runs of this agent",
};
const IDEMPOTENCY_KEY: Param = Param {
    name: "Idempotency-Key",
    location: "header",
    required: false,
    schema: idempotency_header,
    description: "Printable ASCII; wins over the body's idempotency_key when both are given",
};

/// Errors every `/api` route can answer.
macro_rules! api_errors {
    ($($extra:expr),* $(,)?) => {
        &[
            $($extra,)*
            (401, Some("Error"), "No token, or an unknown one (tokens configured)"),
            (500, Some("Error"), "The database failed; the cause is logged, not shown"),
            (
                503,
                Some("Error"),
                "The database is busy (no pooled connection within its wait) or out of \
                 reach; Retry-After says when to try again",
            ),
        ]
    };
}

// What a route that reads a JSON body may answer besides its own statuses.
const BODY_MALFORMED: (u16, Option<&str>, &str) = (400, Some("Error"), "Malformed JSON");
const BODY_TOO_LARGE: (u16, Option<&str>, &str) =
    (413, Some("Error"), "The body is over api.max_body_kb");
const BODY_NOT_JSON: (u16, Option<&str>, &str) =
    (415, Some("Error"), "Not Content-Type: application/json");
const BODY_FIELD: (u16, Option<&str>, &str) = (
    422,
    Some("Error"),
    "A field does not fit; detail.field names it",
);

const READ_ERRORS: [(u16, Option<&str>, &str); 2] = [
    (404, Some("Error"), "No such object"),
    (
        422,
        Some("Error"),
        "A parameter does not fit; detail.field names it",
    ),
];

pub const ROUTES: &[Route] = &[
    Route {
        method: "get",
        path: "/healthz",
        operation_id: "healthz",
        tag: "system",
        summary: "The process is up (never waits behind other requests)",
        params: &[],
        request: None,
        responses: &[(200, Some("Health"), "Up")],
    },
    Route {
        method: "get",
        path: "/readyz",
        operation_id: "readyz",
        tag: "system",
        summary: "The database is reachable and migrated (503 within 2 s otherwise)",
        params: &[],
        request: None,
        responses: &[
            (200, Some("Ready"), "Ready"),
            (
                503,
                Some("Ready"),
                "Not ready: the database is down or not migrated",
            ),
        ],
    },
    Route {
        method: "get",
        path: "/metrics",
        operation_id: "metrics",
        tag: "system",
        summary: "Prometheus text exposition (a token when api.metrics_auth is set)",
        params: &[],
        request: None,
        responses: &[
            (200, Some("#text"), "Prometheus text format 0.0.4"),
            (
                401,
                Some("Error"),
                "api.metrics_auth is set and no valid token was given",
            ),
        ],
    },
    Route {
        method: "get",
        path: "/api/openapi.json",
        operation_id: "openapi",
        tag: "system",
        summary: "This document",
        params: &[],
        request: None,
        responses: api_errors![(200, Some("#object"), "The OpenAPI document")],
    },
    Route {
        method: "get",
        path: "/api/tasks",
        operation_id: "list_tasks",
        tag: "tasks",
        summary: "Tasks, newest first",
        params: &[STATUS, KIND, AGENT_FILTER, LIMIT, OFFSET],
        request: None,
        responses: api_errors![(200, Some("TaskList"), "The page"), READ_ERRORS[1]],
    },
    Route {
        method: "post",
        path: "/api/tasks",
        operation_id: "create_task",
        tag: "tasks",
        summary: "Enqueue a task (201 new; 200 the existing task of a known idempotency key)",
        params: &[IDEMPOTENCY_KEY],
        request: Some(("CreateTask", true)),
        responses: api_errors![
            (201, Some("Task"), "Enqueued"),
            (
                200,
                Some("Task"),
                "The same request was made before with this idempotency key"
            ),
            (
                400,
                Some("Error"),
                "Malformed JSON, or an Idempotency-Key header that is not printable ASCII"
            ),
            (403, Some("Error"), "A read token"),
            (
                409,
                Some("Error"),
                "The idempotency key names a task with another kind or payload; detail.id is that task"
            ),
            BODY_TOO_LARGE,
            BODY_NOT_JSON,
            BODY_FIELD,
        ],
    },
    Route {
        method: "get",
        path: "/api/tasks/stats/summary",
        operation_id: "task_stats",
        tag: "tasks",
        summary: "Tasks per status (they add up to total) and the success rate",
        params: &[],
        request: None,
        responses: api_errors![(200, Some("Stats"), "The counts")],
    },
    Route {
        method: "get",
        path: "/api/tasks/agent/{agent_id}",
        operation_id: "list_agent_tasks",
        tag: "tasks",
        summary: "An agent's runs, newest first",
        params: &[AGENT_ID, LIMIT, OFFSET],
        request: None,
        responses: api_errors![(200, Some("TaskList"), "The page"), READ_ERRORS[1]],
    },
    Route {
        method: "get",
        path: "/api/tasks/{task_id}",
        operation_id: "get_task",
        tag: "tasks",
        summary: "One task",
        params: &[TASK_ID],
        request: None,
        responses: api_errors![
            (200, Some("Task"), "The task"),
            READ_ERRORS[0],
            READ_ERRORS[1]
        ],
    },
    Route {
        method: "delete",
        path: "/api/tasks/{task_id}",
        operation_id: "delete_task",
        tag: "tasks",
        summary: "Delete a task for good (not while it runs: cancel it first)",
        params: &[TASK_ID],
        request: None,
        responses: api_errors![
            (204, None, "Deleted"),
            (409, Some("Error"), "The task is running (cancel it first)"),
            (403, Some("Error"), "A read token"),
            READ_ERRORS[0],
            READ_ERRORS[1],
        ],
    },
    Route {
        method: "get",
        path: "/api/tasks/{task_id}/logs",
        operation_id: "task_logs",
        tag: "tasks",
        summary: "A task's stored output (stdout, stderr and progress, per attempt, head and tail \
                  kept); with follow=true, Server-Sent Events until the task ends",
        params: &[TASK_ID, FOLLOW, AFTER],
        request: None,
        responses: api_errors![
            (200, Some("#logs"), "The output, or its events"),
            READ_ERRORS[0],
            READ_ERRORS[1]
        ],
    },
    Route {
        method: "post",
        path: "/api/tasks/{task_id}/retry",
        operation_id: "retry_task",
        tag: "tasks",
        summary: "A new task like a failed or timed-out one, runnable at once",
        params: &[TASK_ID],
        request: None,
        responses: api_errors![
            (201, Some("Task"), "The new task"),
            (
                409,
                Some("Error"),
                "The task is neither failed nor timed out"
            ),
            (403, Some("Error"), "A read token"),
            READ_ERRORS[0],
            READ_ERRORS[1],
        ],
    },
    Route {
        method: "post",
        path: "/api/tasks/{task_id}/cancel",
        operation_id: "cancel_task",
        tag: "tasks",
        summary: "Cancel a waiting task, or ask the owner of a running one to abort it",
        params: &[TASK_ID],
        request: None,
        responses: api_errors![
            (200, Some("Cancelled"), "Cancelled, or abort requested"),
            (409, Some("Error"), "The task has already ended"),
            (403, Some("Error"), "A read token"),
            READ_ERRORS[0],
            READ_ERRORS[1],
        ],
    },
    Route {
        method: "get",
        path: "/api/agents",
        operation_id: "list_agents",
        tag: "agents",
        summary: "Agents, with their next fire time (env values redacted)",
        params: &[],
        request: None,
        responses: api_errors![
            (200, Some("AgentList"), "The agents"),
            (501, Some("Error"), "This replica does not run agents"),
        ],
    },
    Route {
        method: "post",
        path: "/api/agents",
        operation_id: "create_agent",
        tag: "agents",
        summary: "Register an agent (the code must compile and define class Agent; a command's program must exist)",
        params: &[],
        request: Some(("CreateAgent", true)),
        responses: api_errors![
            (201, Some("Agent"), "Registered"),
            BODY_MALFORMED,
            (403, Some("Error"), "A read token"),
            (409, Some("Error"), "An agent of that name exists"),
            BODY_TOO_LARGE,
            BODY_NOT_JSON,
            BODY_FIELD,
            (501, Some("Error"), "This replica does not run agents"),
        ],
    },
    Route {
        method: "get",
        path: "/api/agents/{id}",
        operation_id: "get_agent",
        tag: "agents",
        summary: "One agent, by id or name, with its next fire time",
        params: &[AGENT],
        request: None,
        responses: api_errors![
            (200, Some("Agent"), "The agent"),
            READ_ERRORS[0],
            READ_ERRORS[1],
            (501, Some("Error"), "This replica does not run agents"),
        ],
    },
    Route {
        method: "patch",
        path: "/api/agents/{id}",
        operation_id: "update_agent",
        tag: "agents",
        summary: "Change an agent's code, command, config fields or active flag",
        params: &[AGENT],
        request: Some(("UpdateAgent", true)),
        responses: api_errors![
            (200, Some("Agent"), "The changed agent"),
            BODY_MALFORMED,
            (403, Some("Error"), "A read token"),
            READ_ERRORS[0],
            BODY_TOO_LARGE,
            BODY_NOT_JSON,
            BODY_FIELD,
            (501, Some("Error"), "This replica does not run agents"),
        ],
    },
    Route {
        method: "delete",
        path: "/api/agents/{id}",
        operation_id: "delete_agent",
        tag: "agents",
        summary: "Remove an agent and its handoffs (its past runs stay)",
        params: &[AGENT],
        request: None,
        responses: api_errors![
            (204, None, "Removed"),
            (403, Some("Error"), "A read token"),
            READ_ERRORS[0],
            READ_ERRORS[1],
            (501, Some("Error"), "This replica does not run agents"),
        ],
    },
    Route {
        method: "post",
        path: "/api/agents/{id}/run",
        operation_id: "run_agent",
        tag: "agents",
        summary: "Enqueue a run now (the body, and its input, are optional)",
        params: &[AGENT],
        request: Some(("RunAgent", false)),
        responses: api_errors![
            (201, Some("Task"), "The run's task"),
            BODY_MALFORMED,
            (403, Some("Error"), "A read token"),
            READ_ERRORS[0],
            BODY_TOO_LARGE,
            BODY_FIELD,
            (501, Some("Error"), "This replica does not run agents"),
        ],
    },
    Route {
        method: "get",
        path: "/api/agents/{id}/handoff",
        operation_id: "get_handoff",
        tag: "agents",
        summary: "The state the agent's next run receives",
        params: &[AGENT],
        request: None,
        responses: api_errors![
            (200, Some("HandoffArtifact"), "The current handoff"),
            (
                404,
                Some("Error"),
                "No such agent, or no handoff yet (or it was cleared)"
            ),
            READ_ERRORS[1],
            (501, Some("Error"), "This replica does not run agents"),
        ],
    },
    Route {
        method: "delete",
        path: "/api/agents/{id}/handoff",
        operation_id: "clear_handoff",
        tag: "agents",
        summary: "Forget the handoff: the next run starts from nothing",
        params: &[AGENT],
        request: None,
        responses: api_errors![
            (204, None, "Forgotten (also when there was none)"),
            (403, Some("Error"), "A read token"),
            READ_ERRORS[0],
            READ_ERRORS[1],
            (501, Some("Error"), "This replica does not run agents"),
        ],
    },
    Route {
        method: "get",
        path: "/api/queues",
        operation_id: "list_queues",
        tag: "queues",
        summary: "Every queue with tasks, a pause on record or a live replica serving it",
        params: &[],
        request: None,
        responses: api_errors![(200, Some("QueueList"), "The queues, by name")],
    },
    Route {
        method: "post",
        path: "/api/queues/{name}/pause",
        operation_id: "pause_queue",
        tag: "queues",
        summary: "Stop every replica claiming from the queue (the body is optional)",
        params: &[QUEUE],
        request: Some(("PauseQueue", false)),
        responses: api_errors![
            (200, Some("QueueState"), "Paused"),
            BODY_MALFORMED,
            (403, Some("Error"), "A read token"),
            BODY_TOO_LARGE,
            BODY_FIELD,
        ],
    },
    Route {
        method: "post",
        path: "/api/queues/{name}/resume",
        operation_id: "resume_queue",
        tag: "queues",
        summary: "Let replicas claim from the queue again, at once",
        params: &[QUEUE],
        request: None,
        responses: api_errors![
            (200, Some("QueueState"), "Resumed"),
            (403, Some("Error"), "A read token"),
            BODY_FIELD,
        ],
    },
    Route {
        method: "get",
        path: "/api/limits",
        operation_id: "list_limits",
        tag: "queues",
        summary: "Every limit, with its tasks running fleet-wide and the due tasks it holds back",
        params: &[],
        request: None,
        responses: api_errors![(200, Some("LimitList"), "The limits")],
    },
    Route {
        method: "put",
        path: "/api/limits/{scope}/{target}",
        operation_id: "set_limit",
        tag: "queues",
        summary: "Add or change a fleet-wide concurrency and/or rate limit",
        params: &[LIMIT_SCOPE, LIMIT_TARGET],
        request: Some(("SetLimit", true)),
        responses: api_errors![
            (
                200,
                Some("Limit"),
                "The limit, in force for every claim from now on"
            ),
            BODY_MALFORMED,
            (403, Some("Error"), "A read token"),
            (404, Some("Error"), "No such agent"),
            BODY_TOO_LARGE,
            BODY_NOT_JSON,
            BODY_FIELD,
        ],
    },
    Route {
        method: "delete",
        path: "/api/limits/{scope}/{target}",
        operation_id: "remove_limit",
        tag: "queues",
        summary: "Remove a limit: its tasks are claimed as others are, at once",
        params: &[LIMIT_SCOPE, LIMIT_TARGET],
        request: None,
        responses: api_errors![
            (204, None, "Removed"),
            (403, Some("Error"), "A read token"),
            (404, Some("Error"), "No such limit or agent"),
            BODY_FIELD,
        ],
    },
    Route {
        method: "get",
        path: "/api/fleet",
        operation_id: "fleet",
        tag: "fleet",
        summary: "Live replicas, the scheduler leader, governor states, latest metrics",
        params: &[],
        request: None,
        responses: api_errors![(200, Some("Fleet"), "The fleet")],
    },
    Route {
        method: "post",
        path: "/api/fleet/resume",
        operation_id: "resume_fleet",
        tag: "fleet",
        summary: "Lift the hold of every replica the governor escalated, and every quarantine",
        params: &[],
        request: None,
        responses: api_errors![
            (
                200,
                Some("ResumedCount"),
                "How many replicas were asked to resume"
            ),
            (403, Some("Error"), "A read token"),
        ],
    },
    Route {
        method: "post",
        path: "/api/fleet/{replica_id}/resume",
        operation_id: "resume_replica",
        tag: "fleet",
        summary: "Lift one replica's hold",
        params: &[REPLICA],
        request: None,
        responses: api_errors![
            (200, Some("Resumed"), "Asked to resume"),
            (403, Some("Error"), "A read token"),
            READ_ERRORS[0],
            READ_ERRORS[1],
        ],
    },
];

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn nullable(mut schema: Value) -> Value {
    if let Some(t) = schema.get("type").cloned() {
        schema["type"] = json!([t, "null"]);
    }
    schema
}

/// The schemas of request bodies, from the constants the server checks. One literal per
/// body, side by side, so it stays whole: split, the bodies would be harder to compare with
/// the handlers that read them.
fn request_schemas(kinds: &[String]) -> Map<String, Value> {
    use crate::agents::MAX_CODE_BYTES;
    use crate::bounds::{CPU_PERCENT, MAX_RETRIES, MEMORY_MB, TIMEOUT_S};
    let mut m = Map::new();
    let queue_name = json!({"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$",
        "description": "A queue: only replicas serving it run the task (default: its agent's, \
                        else `default`)"});
    m.insert(
        "JsonValue".into(),
        // Any type: each keyword below applies only to the values of its own type (a string's
        // pattern, an array's items, an object's keys and values), at every depth.
        json!({
            "description": "Any JSON value whose strings and keys hold no NUL character and \
                            whose numbers are within ±1e300",
            "pattern": NO_NUL,
            "minimum": -crate::db::text::MAX_NUMBER,
            "maximum": crate::db::text::MAX_NUMBER,
            "items": reference("JsonValue"),
            "additionalProperties": reference("JsonValue"),
            "propertyNames": {"pattern": NO_NUL},
        }),
    );
    m.insert(
        "CreateTask".into(),
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["kind"],
            "properties": {
                "kind": {"type": "string", "enum": kinds, "description": "A kind this fleet runs"},
                "payload": reference("JsonValue"),
                "priority": {"type": "integer", "minimum": i32::MIN, "maximum": i32::MAX,
                             "description": "Higher runs first (default 0)"},
                "delay_s": nullable(json!({"type": "number", "minimum": 0,
                                           "maximum": crate::bounds::MAX_DELAY.as_secs_f64(),
                                           "description": "Not before this many seconds from now"})),
                "run_at": nullable(json!({"type": "string", "format": "date-time",
                                          "description": "Not before this time (RFC 3339)"})),
                "max_retries": nullable(json!({"type": "integer", "minimum": 0,
                                               "maximum": MAX_RETRIES})),
                "timeout_s": nullable(json!({"type": "number",
                    "minimum": crate::bounds::TASK_TIMEOUT.0.as_secs_f64(),
                    "maximum": crate::bounds::TASK_TIMEOUT.1.as_secs_f64()})),
                "idempotency_key": nullable(json!({"type": "string", "minLength": 1,
                    "maxLength": crate::queue::MAX_KEY_LEN, "pattern": NO_NUL,
                    "description": "One task per key for ever; the Idempotency-Key header wins over it"})),
                "queue": nullable(queue_name.clone()),
                "concurrency_key": nullable(json!({"type": "string", "minLength": 1,
                    "maxLength": crate::queue::MAX_KEY_LEN, "pattern": NO_NUL,
                    "description": "What limits of scope key count it under (e.g. a customer)"})),
            },
            "not": {
                "description": "give either delay_s or run_at, not both",
                "required": ["delay_s", "run_at"],
                "properties": {"delay_s": {"type": "number"}, "run_at": {"type": "string"}},
            },
            "allOf": payload_rules(kinds),
        }),
    );
    let env_name = "^(?!HARNESS_)[A-Za-z_][A-Za-z0-9_]*$";
    let settings = json!({
        "type": "object",
        "additionalProperties": false,
        "description": "The agent's settings; on PATCH, only the fields given change",
        "properties": {
            "schedule": {"type": ["string", "null"], "pattern": NO_NUL,
                         "description": "Cron: 5 fields, or 6 with seconds first"},
            "timezone": {"type": ["string", "null"], "pattern": NO_NUL,
                         "description": "IANA time zone of the schedule (default UTC)"},
            "timeout": {"type": "integer", "minimum": TIMEOUT_S.0, "maximum": TIMEOUT_S.1,
                        "description": "Seconds"},
            "max_retries": {"type": "integer", "minimum": 0, "maximum": MAX_RETRIES},
            "memory_mb": {"type": "integer", "minimum": MEMORY_MB.0, "maximum": MEMORY_MB.1},
            "cpu_percent": {"type": "integer", "minimum": CPU_PERCENT.0, "maximum": CPU_PERCENT.1},
            "env": {"type": "object", "propertyNames": {"pattern": env_name},
                    "additionalProperties": {"type": "string", "pattern": NO_NUL}},
            "overlap": reference("Overlap"),
            "network": reference("Network"),
            "queue": nullable(queue_name.clone()),
            "requirements": {"type": ["string", "null"], "pattern": NO_NUL,
                             "maxLength": crate::executor::pyenv::MAX_REQUIREMENTS_BYTES,
                             "description": "A Python agent's requirements.txt: its runs use a \
                                             virtual environment with these installed"},
        },
    });
    let own_config = json!({
        "type": "object",
        "description": format!(
            "The agent's own config, passed to Agent(config) on every run (a command finds it \
             as `config` in its input); at most {} bytes as JSON. On PATCH it replaces the \
             config. Deprecated: without `settings`, a config whose every field is a settings \
             field is read as the settings (the response then carries `Deprecation: true`).",
            crate::bounds::AGENT_CONFIG_BYTES
        ),
    });
    let code = json!({"type": "string", "minLength": 1, "maxLength": MAX_CODE_BYTES,
                      "pattern": NO_NUL,
                      "description": "Python source that compiles and defines a top-level class Agent"});
    let command = json!({"type": "array", "minItems": 1,
                         "items": {"type": "string", "pattern": NO_NUL},
                         "description": "A program (found on /usr/local/bin:/usr/bin:/bin) and its arguments"});
    m.insert(
        "CreateAgent".into(),
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["name"],
            "description": "Give exactly one of code and command",
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
                "code": code,
                "command": command,
                "settings": settings,
                "config": own_config,
                "active": {"type": "boolean", "default": true},
            },
        }),
    );
    m.insert(
        "UpdateAgent".into(),
        json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "code": code,
                "command": command,
                "settings": settings,
                "config": own_config,
                "active": {"type": "boolean"},
            },
            "not": {"required": ["code", "command"]},
        }),
    );
    m.insert(
        "SetLimit".into(),
        json!({
            "type": "object",
            "additionalProperties": false,
            "description": "Give a concurrency, a rate, or both",
            "anyOf": [
                {"required": ["concurrency"], "properties": {"concurrency": {"type": "integer"}}},
                {"required": ["rate"], "properties": {"rate": {"type": "string"}}},
            ],
            "properties": {
                "concurrency": nullable(json!({"type": "integer", "minimum": 1,
                    "maximum": crate::queue::limits::MAX_CONCURRENCY,
                    "description": "At most this many of its tasks running at once, fleet-wide"})),
                "rate": nullable(json!({"type": "string",
                    "pattern": "^[1-9][0-9]{0,5}/(s|sec|second|min|m|minute|h|hour|d|day|[1-9][0-9]{0,4}ms|[1-9][0-9]{0,3}s|[1-9][0-9]{0,2}m|([1-9]|1[0-9]|2[0-4])h)$",
                    "description": "At most N starts per interval, fleet-wide: 20/s, 60/min, 1000/h, 5/30s"})),
            },
        }),
    );
    m.insert(
        "PauseQueue".into(),
        json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {"reason": {"type": "string", "pattern": NO_NUL,
                                      "description": "Why, shown with the queue"}},
        }),
    );
    m.insert(
        "RunAgent".into(),
        json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {"input": reference("JsonValue")},
        }),
    );
    m
}

/// What the built-in kinds this replica runs check in a payload at enqueue (see
/// `replica::validate_builtin`), as `if kind … then payload …` rules.
fn payload_rules(kinds: &[String]) -> Vec<Value> {
    use crate::agents::{AGENT_KIND, COMMAND_KIND};
    let rule = |kind: &str, payload: Value| {
        json!({
            "if": {"required": ["kind"], "properties": {"kind": {"const": kind}}},
            "then": {"required": ["payload"], "properties": {"payload": payload}},
        })
    };
    let arg = json!({"type": "string", "pattern": NO_NUL});
    [
        (
            "sleep",
            json!({"type": "object", "required": ["ms"], "properties": {
                "ms": {"type": "integer", "minimum": 0,
                       "maximum": crate::replica::SLEEP_MAX_MS}}}),
        ),
        (
            COMMAND_KIND,
            json!({"type": "object", "required": ["argv"], "properties": {
                "argv": {"type": "array", "minItems": 1,
                         "prefixItems": [{"type": "string", "minLength": 1, "pattern": NO_NUL}],
                         "items": arg},
                "timeout_s": {"type": "integer", "minimum": crate::bounds::TIMEOUT_S.0, "maximum": crate::bounds::TIMEOUT_S.1},
                "env": {"type": "object", "propertyNames": {"pattern": NO_NUL},
                        "additionalProperties": {"type": "string", "pattern": NO_NUL}}}}),
        ),
        (
            AGENT_KIND,
            json!({"type": "object", "required": ["agent_id"],
                   "properties": {"agent_id": {"type": "integer", "minimum": i64::MIN,
                                               "maximum": i64::MAX}}}),
        ),
    ]
    .into_iter()
    .filter(|(kind, _)| kinds.iter().any(|k| k == kind))
    .map(|(kind, payload)| rule(kind, payload))
    .collect()
}

/// The schemas of responses: the Rust types' own (schemars), and small answers spelled here.
/// A list of literals, so it stays whole like the request bodies.
fn response_schemas() -> Map<String, Value> {
    let mut settings = schemars::generate::SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    settings.contract = schemars::generate::Contract::Serialize;
    let mut g = settings.into_generator();
    g.subschema_for::<crate::queue::Task>();
    g.subschema_for::<crate::queue::logs::TaskLogs>();
    g.subschema_for::<crate::agents::Agent>();
    g.subschema_for::<crate::handoff::HandoffArtifact>();
    g.subschema_for::<crate::fleet::ReplicaRow>();
    g.subschema_for::<crate::fleet::quarantines::Quarantine>();
    g.subschema_for::<crate::fleet::serving::QueueView>();
    g.subschema_for::<crate::queue::limits::LimitInfo>();
    g.subschema_for::<crate::queue::limits::Limit>();
    g.subschema_for::<crate::queue::Status>();
    g.subschema_for::<crate::agents::Overlap>();
    g.subschema_for::<crate::executor::Network>();
    let mut defs = g.take_definitions(true);
    use crate::agents::RuntimeKind;
    use crate::queue::AttemptStatus;
    // Plain string enums (schemars spells documented variants as `oneOf` of consts, which
    // client generators turn into unions of literals).
    for (name, values, description) in [
        (
            "Overlap",
            vec!["skip", "queue", "allow"],
            "What a run due while the previous one still runs does: skip (recorded as \
             cancelled with the reason), queue (waits for it) or allow (runs alongside)",
        ),
        (
            "Network",
            vec!["allow", "none"],
            "Whether a run may use the network: allow (the host's) or none (a network \
             namespace of its own with nothing in it)",
        ),
        (
            "Status",
            crate::queue::Status::ALL
                .map(crate::queue::Status::as_str)
                .to_vec(),
            "Where a task is in its lifecycle",
        ),
        (
            "RuntimeKind",
            [RuntimeKind::Python, RuntimeKind::Command]
                .map(RuntimeKind::as_str)
                .to_vec(),
            "What an agent runs: python (its code defines class Agent) or command (an argv)",
        ),
        (
            "AttemptStatus",
            AttemptStatus::ALL.map(AttemptStatus::as_str).to_vec(),
            "How an attempt that did not succeed ended (lost: its replica stopped heartbeating)",
        ),
    ] {
        defs.insert(
            name.into(),
            json!({"type": "string", "enum": values, "description": description}),
        );
    }
    if let Some(agent) = defs.get_mut("Agent") {
        agent["properties"]["next_fire_at"] = json!({"type": ["string", "null"], "format": "date-time",
            "description": "The next cron tick, if the agent has a schedule and is active"});
        agent["properties"]["quarantine"] = json!({
            "anyOf": [reference("Quarantine"), {"type": "null"}],
            "description": "In force when the agent's error burst quarantined it: its runs wait"});
    }
    defs.insert(
        "TaskList".into(),
        json!({"type": "array", "items": reference("Task")}),
    );
    defs.insert(
        "AgentList".into(),
        json!({"type": "array", "items": reference("Agent")}),
    );
    let mut counts = Map::new();
    counts.insert("total".into(), json!({"type": "integer"}));
    counts.insert(
        "success_rate".into(),
        json!({"type": "number",
        "description": "Completed as a percentage of completed + failed + timeout"}),
    );
    for s in crate::queue::Status::ALL {
        counts.insert(s.as_str().into(), json!({"type": "integer"}));
    }
    let required: Vec<&String> = counts.keys().collect();
    defs.insert(
        "Stats".into(),
        json!({"type": "object", "required": required, "properties": counts}),
    );
    defs.insert(
        "Fleet".into(),
        json!({"type": "object", "required": ["replicas", "leader", "quarantines"], "properties": {
            "replicas": {"type": "array", "items": reference("ReplicaRow")},
            "leader": {"type": ["string", "null"]},
            "quarantines": {"type": "array", "items": reference("Quarantine"),
                            "description": "Agents and kinds no replica starts for now"},
        }}),
    );
    defs.insert(
        "QueueList".into(),
        json!({"type": "object", "required": ["queues"], "properties": {
            "queues": {"type": "array", "items": reference("QueueView")},
        }}),
    );
    defs.insert(
        "LimitList".into(),
        json!({"type": "object", "required": ["limits"], "properties": {
            "limits": {"type": "array", "items": reference("LimitInfo")},
        }}),
    );
    defs.insert(
        "QueueState".into(),
        json!({"type": "object", "required": ["name", "paused", "changed"], "properties": {
            "name": {"type": "string"},
            "paused": {"type": "boolean"},
            "changed": {"type": "boolean",
                        "description": "False when it already was in that state"},
        }}),
    );
    defs.insert(
        "Cancelled".into(),
        json!({"type": "object", "required": ["id", "status", "cancel_requested"], "properties": {
            "id": {"type": "integer"},
            "status": reference("Status"),
            "cancel_requested": {"type": "boolean"},
        }}),
    );
    defs.insert(
        "Resumed".into(),
        json!({"type": "object", "required": ["resumed"], "properties": {
            "resumed": {"type": "array", "items": {"type": "string"}},
        }}),
    );
    defs.insert(
        "ResumedCount".into(),
        json!({"type": "object", "required": ["resumed", "quarantines_lifted"], "properties": {
            "resumed": {"type": "integer"},
            "quarantines_lifted": {"type": "integer"},
        }}),
    );
    defs.insert(
        "Health".into(),
        json!({"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}),
    );
    defs.insert(
        "Ready".into(),
        json!({"type": "object", "required": ["status"], "properties": {
            "status": {"type": "string", "enum": ["ready", "unavailable"]},
            "error": {"type": "string"},
            "detail": {},
        }}),
    );
    defs.insert(
        "Error".into(),
        json!({"type": "object", "required": ["error", "detail"], "properties": {
            "error": {"type": "string", "description": "What went wrong, for a person"},
            "detail": {"description": "More: for a 422, {field, reason}"},
        }}),
    );
    defs
}

/// Replaces the boolean schema `true` ("anything") by its object form `{}` where a subschema
/// goes: the same meaning, and client generators that know only object schemas can read it.
fn spell_out_true(schema: &mut Value) {
    let Value::Object(map) = schema else { return };
    for (key, v) in map.iter_mut() {
        match key.as_str() {
            "properties" | "$defs" | "patternProperties" => {
                if let Value::Object(props) = v {
                    for p in props.values_mut() {
                        if *p == Value::Bool(true) {
                            *p = json!({});
                        }
                        spell_out_true(p);
                    }
                }
            }
            "items" | "additionalProperties" | "not" | "propertyNames" => {
                if *v == Value::Bool(true) {
                    *v = json!({});
                }
                spell_out_true(v);
            }
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                if let Value::Array(list) = v {
                    for s in list {
                        if *s == Value::Bool(true) {
                            *s = json!({});
                        }
                        spell_out_true(s);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Where a created object can be used next, for clients and for stateful API testers.
fn links(operation_id: &str) -> Option<Value> {
    let by = |param: &str, ops: &[&str]| -> Value {
        let mut m = Map::new();
        for op in ops {
            m.insert(
                op.to_string(),
                json!({"operationId": op, "parameters": {param: "$response.body#/id"}}),
            );
        }
        Value::Object(m)
    };
    match operation_id {
        "create_task" | "retry_task" | "run_agent" => Some(by(
            "task_id",
            &["get_task", "cancel_task", "retry_task", "delete_task"],
        )),
        "create_agent" => Some(by(
            "id",
            &[
                "get_agent",
                "update_agent",
                "run_agent",
                "get_handoff",
                "clear_handoff",
                "delete_agent",
            ],
        )),
        _ => None,
    }
}

/// The document of a replica that runs `kinds`, built anew on each call (it is small).
pub fn document(kinds: &[String]) -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let mut op = json!({
            "summary": r.summary,
            "operationId": r.operation_id,
            "tags": [r.tag],
            "responses": {},
        });
        if !r.params.is_empty() {
            op["parameters"] = r
                .params
                .iter()
                .map(|p| {
                    json!({"name": p.name, "in": p.location, "required": p.required,
                           "schema": (p.schema)(), "description": p.description})
                })
                .collect();
        }
        if let Some((schema, required)) = r.request {
            op["requestBody"] = json!({"required": required,
                "content": {"application/json": {"schema": reference(schema)}}});
        }
        for (status, schema, description) in r.responses {
            let mut resp = json!({ "description": description });
            match schema {
                None => {}
                Some("#text") => {
                    resp["content"] = json!({"text/plain": {"schema": {"type": "string"}}})
                }
                Some("#object") => {
                    resp["content"] = json!({"application/json": {"schema": {"type": "object"}}})
                }
                Some("#logs") => {
                    resp["content"] = json!({
                        "application/json": {"schema": reference("TaskLogs")},
                        "text/event-stream": {"schema": {"type": "string"}},
                    })
                }
                Some(s) => resp["content"] = json!({"application/json": {"schema": reference(s)}}),
            }
            if (200..300).contains(status)
                && let Some(l) = links(r.operation_id)
            {
                resp["links"] = l;
            }
            op["responses"][status.to_string()] = resp;
        }
        if r.path.starts_with("/api") {
            op["security"] = json!([{"bearer": []}]);
        }
        let entry = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        entry[r.method] = op;
    }
    let mut schemas = response_schemas();
    schemas.extend(request_schemas(kinds));
    for schema in schemas.values_mut() {
        spell_out_true(schema);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Agent Harness API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Tasks, agents and the fleet of an Agent Harness replica. Every error is \
                JSON {error, detail}; a 422 names the field in detail.field.",
        },
        "tags": [
            {"name": "tasks", "description": "The queue"},
            {"name": "agents", "description": "Agents, their runs and handoffs"},
            {"name": "queues", "description": "Named queues: backlog, serving replicas, pause"},
            {"name": "fleet", "description": "Replicas and their governors"},
            {"name": "system", "description": "Health, readiness, metrics and this document"},
        ],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_ids_are_unique_and_every_ref_resolves() {
        let doc = document(&["echo".into()]);
        let mut ids = std::collections::HashSet::new();
        for r in ROUTES {
            assert!(ids.insert(r.operation_id), "{} twice", r.operation_id);
        }
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = doc.to_string();
        for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &part[..part.find('"').unwrap()];
            assert!(
                schemas.contains_key(name),
                "{name} is referenced but not defined"
            );
        }
        assert_eq!(
            doc["components"]["schemas"]["CreateTask"]["properties"]["kind"]["enum"],
            json!(["echo"])
        );
    }
}
