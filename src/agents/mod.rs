//! The agent registry (code, schedule, limits) and the `agent` and `command` task kinds.
//!
//! An agent is a name, a runtime (`python` source defining `class Agent`, or a `command`
//! argv), its settings `{schedule, timezone, timeout, max_retries, memory_mb, cpu_percent,
//! env, overlap, network, requirements}`, its own `config` (the JSON object `Agent(config)`
//! receives, and a command finds in its input) and an `active` flag. Everything is validated before it is stored, and every
//! error names the field and what is allowed. Every change sends `NOTIFY harness_agents`.
//!
//! A run of an agent is a task of kind `agent` (payload `{"agent_id", "input"}`): it runs in
//! the executor's sandbox with the agent's limits, receives the previous handoff, and hands
//! its state to the next run in the transaction that completes it (see [`handoff`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::cron::CronSchedule;
use crate::executor::{ExecStatus, Executor, RunSpec, Runtime};
use crate::handoff::{self, HandoffManager, HandoffWrite};
use crate::queue::logs::LogWriter;
use crate::queue::{Enqueued, NewTask, Queue};
use crate::worker::{Handler, HandlerError, TaskContext};

// The channel every replica's scheduler listens on for agent changes, spelled once.
macro_rules! agents_channel {
    () => {
        "harness_agents"
    };
}
/// The channel every replica's scheduler listens on for agent changes.
pub const AGENTS_CHANNEL: &str = agents_channel!();
/// `FROM a, <this>`: the change is announced in the statement that makes it.
macro_rules! notify_agents {
    () => {
        concat!("(SELECT pg_notify('", agents_channel!(), "', '')) n")
    };
}
/// The task kind of an agent run.
pub const AGENT_KIND: &str = "agent";
/// The task kind of an ad-hoc command run through the sandbox.
pub const COMMAND_KIND: &str = "command";
/// How long a run deferred by `overlap: queue` waits before it looks again.
const OVERLAP_RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("an agent named {0:?} already exists")]
    Duplicate(String),
    #[error("no agent named {0:?}")]
    NotFound(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Queue(#[from] crate::queue::Error),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        reason: reason.into(),
    }
}

/// What a run due while the previous run still runs does.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    /// Recorded as skipped (`cancelled`, with the reason).
    #[default]
    Skip,
    /// Waits until the previous run ends.
    Queue,
    /// Runs alongside.
    Allow,
}

impl std::str::FromStr for Overlap {
    type Err = String;

    fn from_str(s: &str) -> Result<Overlap, String> {
        match s {
            "skip" => Ok(Overlap::Skip),
            "queue" => Ok(Overlap::Queue),
            "allow" => Ok(Overlap::Allow),
            other => Err(format!(
                "{other:?} is not an overlap; use skip, queue or allow"
            )),
        }
    }
}

/// An agent's settings (schedule and limits), stored as `agents.config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    pub schedule: Option<String>,
    pub timezone: Option<String>,
    /// Seconds.
    pub timeout: u64,
    pub max_retries: u32,
    pub memory_mb: u64,
    pub cpu_percent: u32,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub overlap: Overlap,
    /// `allow` (the host's network) or `none` (no connection leaves the run).
    #[serde(default)]
    pub network: crate::executor::Network,
    /// A Python agent's `requirements.txt`: its runs use a virtual environment with these
    /// installed (built on each host at first use, cached by hash).
    #[serde(default)]
    pub requirements: Option<String>,
    /// The queue its runs wait in (`default` when none): only replicas that serve it run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

/// An agent's own config: the JSON object `Agent(config)` receives.
pub type AgentOwnConfig = serde_json::Map<String, Value>;

/// The settings under their former name.
#[deprecated(note = "renamed AgentSettings; an agent's `config` is now its own JSON object")]
pub type AgentConfig = AgentSettings;

/// Checks an agent's own config: a JSON object PostgreSQL can store, within its bound.
pub fn validate_own_config(config: &AgentOwnConfig) -> Result<(), Error> {
    let size = serde_json::to_string(config).map_or(usize::MAX, |s| s.len());
    if size > crate::bounds::AGENT_CONFIG_BYTES {
        return Err(invalid(
            "config",
            format!(
                "is {size} bytes as JSON; allowed up to {} (keep large data elsewhere and put \
                 a reference in the config)",
                crate::bounds::AGENT_CONFIG_BYTES
            ),
        ));
    }
    if crate::db::text::needs_change(&Value::Object(config.clone())) {
        return Err(invalid(
            "config",
            "holds a NUL character (\\u0000) or a number beyond PostgreSQL's range, which it \
             cannot store",
        ));
    }
    Ok(())
}

/// Bounds on an agent's limits.
pub use crate::bounds::{CPU_PERCENT, MAX_RETRIES, MEMORY_MB, TIMEOUT_S};
/// Largest Python source accepted.
pub const MAX_CODE_BYTES: usize = 1024 * 1024;

impl AgentSettings {
    /// The defaults of a new agent, from the executor and bulk settings.
    pub fn defaults(cfg: &crate::config::Config) -> AgentSettings {
        AgentSettings {
            schedule: None,
            timezone: None,
            timeout: cfg.executor.default_timeout_s,
            max_retries: cfg.bulk.retry_attempts,
            memory_mb: cfg.executor.max_memory_mb,
            cpu_percent: cfg.executor.max_cpu_percent,
            env: BTreeMap::new(),
            overlap: Overlap::Skip,
            network: crate::executor::Network::Allow,
            requirements: None,
            queue: None,
        }
    }

    /// The queue its runs wait in.
    pub fn queue(&self) -> &str {
        self.queue.as_deref().unwrap_or(crate::queue::DEFAULT_QUEUE)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        let between = |field, v: u64, (lo, hi): (u64, u64), unit: &str| {
            if v < lo || v > hi {
                Err(invalid(
                    field,
                    format!("{v} is out of range; allowed {lo} to {hi} {unit}"),
                ))
            } else {
                Ok(())
            }
        };
        between("timeout", self.timeout, TIMEOUT_S, "seconds (1 s to 24 h)")?;
        between(
            "memory_mb",
            self.memory_mb,
            MEMORY_MB,
            "MB (16 MB to 64 GB)",
        )?;
        between(
            "cpu_percent",
            self.cpu_percent as u64,
            (CPU_PERCENT.0 as u64, CPU_PERCENT.1 as u64),
            "percent",
        )?;
        if self.max_retries > MAX_RETRIES {
            return Err(invalid(
                "max_retries",
                format!("allowed 0 to {MAX_RETRIES}"),
            ));
        }
        if let Some(q) = &self.queue {
            crate::queue::validate_queue_name(q).map_err(|reason| invalid("queue", reason))?;
        }
        let cron_error = |e: crate::cron::CronError| invalid(e.field(), e.to_string());
        crate::cron::time_zone(self.timezone.as_deref()).map_err(cron_error)?;
        if let Some(s) = &self.schedule {
            CronSchedule::parse(s, self.timezone.as_deref()).map_err(cron_error)?;
        }
        if let Some(r) = &self.requirements {
            use crate::executor::pyenv::MAX_REQUIREMENTS_BYTES;
            if r.len() > MAX_REQUIREMENTS_BYTES {
                return Err(invalid(
                    "requirements",
                    format!("is over {MAX_REQUIREMENTS_BYTES} bytes"),
                ));
            }
            if r.contains('\0') {
                return Err(invalid("requirements", "holds a NUL character"));
            }
        }
        for (k, v) in &self.env {
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(invalid(
                    "env",
                    format!("{k:?} is not a variable name (letters, digits, _)"),
                ));
            }
            if k.starts_with("HARNESS_") {
                return Err(invalid("env", format!("{k} is reserved for the harness")));
            }
            if v.contains('\0') {
                return Err(invalid(
                    "env",
                    format!("the value of {k} contains a NUL byte"),
                ));
            }
        }
        Ok(())
    }

    /// The parsed schedule, if any.
    pub fn schedule(&self) -> Option<CronSchedule> {
        self.schedule
            .as_deref()
            .and_then(|s| CronSchedule::parse(s, self.timezone.as_deref()).ok())
    }
}

/// A registered agent.
///
/// In JSON an agent is flat: `runtime` (`python` or `command`) next to the `code` or the
/// `command` argv it names (see [`AgentJson`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(into = "AgentJson", try_from = "AgentJson")]
pub struct Agent {
    pub id: i64,
    pub name: String,
    pub runtime: Runtime,
    pub settings: AgentSettings,
    /// What `Agent(config)` receives on every run.
    pub config: AgentOwnConfig,
    pub active: bool,
    /// The last cron tick the scheduler enqueued (or skipped) for this agent.
    pub last_fire_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Which runtime an agent has, as stored in `agents.runtime` and shown in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// Python source defining `class Agent` (in `code`).
    Python,
    /// A program and its arguments (in `command`).
    Command,
}

impl RuntimeKind {
    pub fn of(runtime: &Runtime) -> RuntimeKind {
        match runtime {
            Runtime::Python { .. } => RuntimeKind::Python,
            Runtime::Command { .. } => RuntimeKind::Command,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Python => "python",
            RuntimeKind::Command => "command",
        }
    }
}

impl sqlx::Type<sqlx::Postgres> for RuntimeKind {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <String as sqlx::Type<sqlx::Postgres>>::type_info()
    }
    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <String as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for RuntimeKind {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        match <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)? {
            "python" => Ok(RuntimeKind::Python),
            "command" => Ok(RuntimeKind::Command),
            other => Err(format!("unknown agent runtime {other:?}").into()),
        }
    }
}

/// An agent as JSON (the API's `Agent` schema): the runtime kind beside its code or argv.
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(rename = "Agent")]
pub struct AgentJson {
    pub id: i64,
    pub name: String,
    pub runtime: RuntimeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    pub settings: AgentSettings,
    /// What `Agent(config)` receives on every run (a command: `config` in its input).
    pub config: AgentOwnConfig,
    pub active: bool,
    /// The last cron tick the scheduler enqueued (or skipped) for this agent.
    pub last_fire_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Agent> for AgentJson {
    fn from(a: Agent) -> AgentJson {
        let kind = RuntimeKind::of(&a.runtime);
        let (code, command) = match a.runtime {
            Runtime::Python { code } => (Some(code), None),
            Runtime::Command { argv } => (None, Some(argv)),
        };
        AgentJson {
            id: a.id,
            name: a.name,
            runtime: kind,
            code,
            command,
            settings: a.settings,
            config: a.config,
            active: a.active,
            last_fire_at: a.last_fire_at,
            created_at: a.created_at,
            updated_at: a.updated_at,
        }
    }
}

impl TryFrom<AgentJson> for Agent {
    type Error = Error;

    fn try_from(j: AgentJson) -> Result<Agent, Error> {
        Ok(Agent {
            id: j.id,
            name: j.name,
            runtime: runtime_from(j.runtime, j.code, j.command)?,
            settings: j.settings,
            config: j.config,
            active: j.active,
            last_fire_at: j.last_fire_at,
            created_at: j.created_at,
            updated_at: j.updated_at,
        })
    }
}

impl schemars::JsonSchema for Agent {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        AgentJson::schema_name()
    }

    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        AgentJson::json_schema(g)
    }
}

/// The runtime a stored or sent kind names, refusing a kind without what it needs.
fn runtime_from(
    kind: RuntimeKind,
    code: Option<String>,
    command: Option<Vec<String>>,
) -> Result<Runtime, Error> {
    match (kind, code, command) {
        (RuntimeKind::Python, Some(code), _) => Ok(Runtime::Python { code }),
        (RuntimeKind::Command, _, Some(argv)) => Ok(Runtime::Command { argv }),
        (RuntimeKind::Python, None, _) => Err(invalid("code", "a python agent needs its code")),
        (RuntimeKind::Command, _, None) => {
            Err(invalid("command", "a command agent needs its argv"))
        }
    }
}

impl Agent {
    /// Where the schedule continues from: the last tick, or the last change (a new,
    /// changed or resumed agent does not owe runs for ticks before it).
    pub fn schedule_base(&self) -> DateTime<Utc> {
        self.last_fire_at
            .map_or(self.updated_at, |l| l.max(self.updated_at))
    }

    /// The next fire time after now, when the agent is active and scheduled.
    pub fn next_fire(&self) -> Option<DateTime<Utc>> {
        if !self.active {
            return None;
        }
        let schedule = self.settings.schedule()?;
        schedule.next_after(self.schedule_base().max(Utc::now()))
    }
}

type Row = (
    i64,
    String,
    RuntimeKind,
    Option<String>,
    Option<Vec<String>>,
    Value,
    Value,
    bool,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    DateTime<Utc>,
);

fn from_row(r: Row) -> Result<Agent, Error> {
    let settings: AgentSettings = serde_json::from_value(r.5)
        .map_err(|e| invalid("settings", format!("stored settings unreadable: {e}")))?;
    let Value::Object(config) = r.6 else {
        return Err(invalid("config", "stored config is not a JSON object"));
    };
    Ok(Agent {
        id: r.0,
        name: r.1,
        runtime: runtime_from(r.2, r.3, r.4)?,
        settings,
        config,
        active: r.7,
        last_fire_at: r.8,
        created_at: r.9,
        updated_at: r.10,
    })
}

const COLUMNS: &str = "id, name, runtime, code, command, config, agent_config, active, last_fire_at, created_at, \
     updated_at";

/// A validated agent definition, ready to store.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub name: String,
    pub runtime: Runtime,
    pub settings: AgentSettings,
    pub config: AgentOwnConfig,
}

/// Checks a name: 1–64 letters, digits, `_`, `-`, `.`, starting with a letter or digit.
pub fn parse_name(name: &str) -> Result<String, Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(invalid(
            "name",
            format!(
                "{name:?} must be 1 to 64 letters, digits, _ - . starting with a letter or digit"
            ),
        ))
    }
}

/// The id of the agent named `name` (for callers that hold a pool, not an [`Agents`]).
pub async fn id_of(pool: &PgPool, name: &str) -> Result<i64, Error> {
    let id: Option<i64> = sqlx::query_scalar("SELECT id FROM agents WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await?;
    id.ok_or_else(|| Error::NotFound(name.to_string()))
}

/// The names of the agents among `ids`, by id (agents removed since are missing).
pub async fn names_of(
    pool: &PgPool,
    ids: &[i64],
) -> Result<std::collections::HashMap<i64, String>, Error> {
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, name FROM agents WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

/// The code of the agents [`seed_for_bench`] registers: small, like most agents' code.
const BENCH_AGENT_CODE: &str = r#"class Agent:
    def __init__(self, config):
        self.source = config.get("source", "https://api.example.com/items")
        self.batch = config.get("batch", 50)

    def execute(self):
        previous = (self.handoff or {}).get("state") or {}
        count = previous.get("count", 0) + 1
        return {"state": {"count": count}, "summary": f"run {count} of {self.source}"}
"#;

/// Registers `n` Python agents named `agent-001`, `agent-002`… with `settings` (validated),
/// half of them with an own config, straight into the table, for `harness bench --console`:
/// rows as [`Agents::create`] stores them, without its check of the code by the interpreter
/// (one interpreter start per agent, and a benchmark of the console needs no Python). They
/// were created eight days ago and fired last now. Returns `(id, name)` by name.
pub async fn seed_for_bench(
    pool: &PgPool,
    n: usize,
    settings: &AgentSettings,
) -> Result<Vec<(i64, String)>, Error> {
    settings.validate()?;
    let names: Vec<String> = (1..=n).map(|i| format!("agent-{i:03}")).collect();
    let configs: Vec<Value> = (1..=n)
        .map(|i| {
            if i % 2 == 0 {
                json!({"source": format!("https://api.example.com/feeds/{i}"), "batch": 50})
            } else {
                json!({})
            }
        })
        .collect();
    Ok(sqlx::query_as(&format!(
        "WITH a AS (INSERT INTO agents (name, runtime, code, config, agent_config, \
             last_fire_at, created_at, updated_at) \
             SELECT u.name, $3, $4, $5, u.config, now(), now() - interval '8 days', \
                    now() - interval '8 days' \
             FROM unnest($1::text[], $2::jsonb[]) AS u(name, config) RETURNING id, name) \
         SELECT a.id, a.name FROM a, {NOTIFY} ORDER BY a.name",
        NOTIFY = notify_agents!()
    ))
    .bind(&names)
    .bind(&configs)
    .bind(RuntimeKind::Python.as_str())
    .bind(BENCH_AGENT_CODE)
    .bind(serde_json::to_value(settings).expect("settings serialise"))
    .fetch_all(pool)
    .await?)
}

/// The registry: agents in the database.
#[derive(Clone)]
pub struct Agents {
    pool: PgPool,
    executor: Arc<Executor>,
}

impl Agents {
    pub fn new(pool: PgPool, executor: Arc<Executor>) -> Agents {
        Agents { pool, executor }
    }

    pub fn executor(&self) -> &Arc<Executor> {
        &self.executor
    }

    /// Validates the code (Python compiles and defines `class Agent`; a command's program
    /// exists), the settings and the config.
    pub async fn validate(&self, spec: &AgentSpec) -> Result<(), Error> {
        parse_name(&spec.name)?;
        spec.settings.validate()?;
        validate_own_config(&spec.config)?;
        match &spec.runtime {
            Runtime::Python { code } => {
                if code.len() > MAX_CODE_BYTES {
                    return Err(invalid("code", format!("is over {MAX_CODE_BYTES} bytes")));
                }
                if crate::db::text::has_nul(code) {
                    return Err(invalid(
                        "code",
                        "holds a NUL character, which is not allowed",
                    ));
                }
                self.executor
                    .check_python(code)
                    .await
                    .map_err(|e| invalid("code", e))?;
                if let Some(requirements) = &spec.settings.requirements {
                    // Built now: requirements that cannot be installed are refused with the
                    // installer's error, and the first run finds the environment ready.
                    self.executor
                        .environment(requirements)
                        .await
                        .map_err(|e| invalid("requirements", e))?;
                }
            }
            Runtime::Command { argv } => {
                if spec.settings.requirements.is_some() {
                    return Err(invalid(
                        "requirements",
                        "apply to Python agents only; a command brings its own environment",
                    ));
                }
                let Some(program) = argv.first() else {
                    return Err(invalid(
                        "command",
                        "is empty; give a program and its arguments",
                    ));
                };
                if let Some(i) = argv.iter().position(|a| crate::db::text::has_nul(a)) {
                    return Err(invalid(
                        "command",
                        format!("argument {i} holds a NUL character, which is not allowed"),
                    ));
                }
                if !crate::executor::program_exists(program) {
                    return Err(invalid(
                        "command",
                        format!(
                            "program {program:?} not found (agents see PATH=/usr/local/bin:/usr/bin:/bin)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub async fn create(&self, spec: AgentSpec) -> Result<Agent, Error> {
        self.validate(&spec).await?;
        let (runtime, code, command) = split_runtime(&spec.runtime);
        let row: Result<Row, sqlx::Error> = sqlx::query_as(&format!(
            "WITH a AS (INSERT INTO agents (name, runtime, code, command, config, agent_config) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}) \
             SELECT a.* FROM a, {NOTIFY}",
            NOTIFY = notify_agents!()
        ))
        .bind(&spec.name)
        .bind(runtime.as_str())
        .bind(code)
        .bind(command)
        .bind(serde_json::to_value(&spec.settings).expect("settings serialise"))
        .bind(Value::Object(spec.config.clone()))
        .fetch_one(&self.pool)
        .await;
        match row {
            Ok(r) => from_row(r),
            Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("23505") => {
                Err(Error::Duplicate(spec.name))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list(&self) -> Result<Vec<Agent>, Error> {
        let rows: Vec<Row> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM agents ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(from_row).collect()
    }

    pub async fn get(&self, name: &str) -> Result<Agent, Error> {
        if crate::db::text::has_nul(name) {
            return Err(invalid(
                "name",
                "holds a NUL character, which no agent name has",
            ));
        }
        let row: Option<Row> =
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM agents WHERE name = $1"))
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        row.map(from_row)
            .unwrap_or_else(|| Err(Error::NotFound(name.to_string())))
    }

    pub async fn get_by_id(&self, id: i64) -> Result<Agent, Error> {
        let row: Option<Row> =
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM agents WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(from_row)
            .unwrap_or_else(|| Err(Error::NotFound(format!("#{id}"))))
    }

    /// Replaces an agent's runtime, settings and config (validated first).
    pub async fn update(
        &self,
        name: &str,
        runtime: Runtime,
        settings: AgentSettings,
        config: AgentOwnConfig,
    ) -> Result<Agent, Error> {
        let spec = AgentSpec {
            name: name.to_string(),
            runtime,
            settings,
            config,
        };
        self.validate(&spec).await?;
        let (rt, code, command) = split_runtime(&spec.runtime);
        let row: Option<Row> = sqlx::query_as(&format!(
            "WITH a AS (UPDATE agents SET runtime = $2, code = $3, command = $4, config = $5, \
             agent_config = $6, updated_at = now() WHERE name = $1 RETURNING {COLUMNS}) \
             SELECT a.* FROM a, {NOTIFY}",
            NOTIFY = notify_agents!()
        ))
        .bind(name)
        .bind(rt.as_str())
        .bind(code)
        .bind(command)
        .bind(serde_json::to_value(&spec.settings).expect("settings serialise"))
        .bind(Value::Object(spec.config.clone()))
        .fetch_optional(&self.pool)
        .await?;
        row.map(from_row)
            .unwrap_or_else(|| Err(Error::NotFound(name.to_string())))
    }

    pub async fn set_active(&self, name: &str, active: bool) -> Result<Agent, Error> {
        let row: Option<Row> = sqlx::query_as(&format!(
            "WITH a AS (UPDATE agents SET active = $2, updated_at = now() WHERE name = $1 \
             RETURNING {COLUMNS}) SELECT a.* FROM a, {NOTIFY}",
            NOTIFY = notify_agents!()
        ))
        .bind(name)
        .bind(active)
        .fetch_optional(&self.pool)
        .await?;
        row.map(from_row)
            .unwrap_or_else(|| Err(Error::NotFound(name.to_string())))
    }

    /// Lifts a quarantine of the agent's runs (see `governor`); returns whether there was one.
    pub async fn lift_quarantine(&self, agent: &Agent) -> Result<bool, Error> {
        let target = crate::worker::Target::of(AGENT_KIND, Some(agent.id));
        Ok(crate::fleet::quarantines::lift(&self.pool, Some(&target)).await? > 0)
    }

    /// Removes an agent and its handoffs; its past tasks stay, detached.
    pub async fn remove(&self, name: &str) -> Result<(), Error> {
        let n = sqlx::query(concat!(
            "WITH a AS (DELETE FROM agents WHERE name = $1 RETURNING id) \
             SELECT a.id FROM a, ",
            notify_agents!()
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        n.map(|_| ())
            .ok_or_else(|| Error::NotFound(name.to_string()))
    }

    /// Enqueues a run of the agent now.
    pub async fn run(&self, queue: &Queue, name: &str, input: Value) -> Result<Enqueued, Error> {
        let agent = self.get(name).await?;
        Ok(queue.enqueue(self.new_run(&agent, input)).await?)
    }

    /// The task of one run of `agent`.
    pub fn new_run(&self, agent: &Agent, input: Value) -> NewTask {
        NewTask::new(AGENT_KIND, json!({ "agent_id": agent.id, "input": input }))
            .agent_id(agent.id)
            .queue(agent.settings.queue())
            .max_retries(agent.settings.max_retries)
            // The sandbox enforces the agent's timeout; the pool's is a backstop above it.
            .timeout(
                Duration::from_secs(agent.settings.timeout)
                    + self.executor.kill_grace
                    + Duration::from_secs(10),
            )
    }

    /// Active agents with a schedule (what the scheduler fires).
    pub async fn scheduled(&self) -> Result<Vec<Agent>, Error> {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM agents WHERE active AND config->>'schedule' IS NOT NULL"
        ))
        .fetch_all(&self.pool)
        .await?;
        // One unreadable agent must not stop every other schedule.
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let name = r.1.clone();
                from_row(r)
                    .map_err(|e| tracing::error!(agent = %name, error = %e, "agent not scheduled"))
                    .ok()
            })
            .collect())
    }

    /// Records on the caller's transaction that tick `at` of an agent was handled (enqueued
    /// or skipped); never moves backwards. Returns false, and records nothing, when the
    /// agent has been paused or removed meanwhile (the row lock keeps it so until commit).
    pub async fn mark_fired_in(
        conn: &mut sqlx::PgConnection,
        agent_id: i64,
        at: DateTime<Utc>,
    ) -> Result<bool, Error> {
        let row: Option<i64> = sqlx::query_scalar(
            "UPDATE agents SET last_fire_at = GREATEST(last_fire_at, $2) \
             WHERE id = $1 AND active RETURNING id",
        )
        .bind(agent_id)
        .bind(at)
        .fetch_optional(conn)
        .await?;
        Ok(row.is_some())
    }

    pub fn handoffs(&self) -> HandoffManager {
        HandoffManager::new(self.pool.clone())
    }

    /// Whether another run of the agent must go first: for `skip`, a run claimed before this
    /// one and still running; for `queue`, any earlier run that is running or due.
    async fn must_wait(
        &self,
        agent_id: i64,
        id: i64,
        overlap: Overlap,
    ) -> Result<bool, crate::queue::Error> {
        let queue = Queue::new(self.pool.clone(), 0);
        match overlap {
            Overlap::Skip => queue.earlier_run_running(AGENT_KIND, agent_id, id).await,
            Overlap::Queue | Overlap::Allow => {
                queue.earlier_run_waiting(AGENT_KIND, agent_id, id).await
            }
        }
    }

    /// One run of an agent, as the `agent` task kind.
    async fn run_agent(&self, ctx: TaskContext) -> Result<Value, HandlerError> {
        validate_agent_payload(&ctx.payload).map_err(HandlerError::permanent)?;
        let agent_id = crate::worker::whole(&ctx.payload["agent_id"]).unwrap_or_default();
        let agent = match self.get_by_id(agent_id).await {
            Ok(a) => a,
            Err(Error::NotFound(_)) => {
                ctx.skip(format!("agent #{agent_id} no longer exists"));
                return Ok(Value::Null);
            }
            Err(e) => return Err(HandlerError::Retryable(e.to_string())),
        };
        if agent.settings.overlap != Overlap::Allow
            && self
                .must_wait(agent.id, ctx.id, agent.settings.overlap)
                .await
                .map_err(|e| HandlerError::Retryable(e.to_string()))?
        {
            match agent.settings.overlap {
                Overlap::Skip => ctx.skip(format!(
                    "skipped: a previous run of agent {} is still running (overlap: skip)",
                    agent.name
                )),
                _ => ctx.defer(OVERLAP_RECHECK),
            }
            return Ok(Value::Null);
        }
        let manager = self.handoffs();
        let previous = manager
            .load_artifact(agent.id)
            .await
            .map_err(|e| HandlerError::Retryable(e.to_string()))?;
        let mut spec = RunSpec::new(agent.runtime.clone(), &self.executor);
        spec.config = Value::Object(agent.config.clone());
        spec.input = ctx.payload.get("input").cloned().unwrap_or(Value::Null);
        spec.handoff = handoff::for_agent(previous.as_ref());
        spec.timeout = Duration::from_secs(agent.settings.timeout);
        spec.memory_mb = agent.settings.memory_mb;
        spec.cpu_percent = agent.settings.cpu_percent;
        spec.env = agent.settings.env.clone();
        spec.network = agent.settings.network;
        if let Some(requirements) = &agent.settings.requirements {
            spec.python =
                Some(self.executor.environment(requirements).await.map_err(|e| {
                    HandlerError::Retryable(format!("the agent's environment: {e}"))
                })?);
        }
        // The sandboxed process continues this run's trace.
        spec.traceparent =
            crate::telemetry::current_traceparent().or_else(|| ctx.traceparent.clone());
        let Some(result) = self.run_logged(&ctx, &mut spec).await? else {
            return Ok(Value::Null);
        };
        let error = result.error.clone().unwrap_or_default();
        let record = serde_json::to_value(&result).expect("result serialises");
        match result.status {
            ExecStatus::Success => {
                let value = result.result.clone().unwrap_or_else(|| json!({}));
                ctx.hand_off(HandoffWrite::next(
                    agent.id,
                    previous.as_ref(),
                    &value,
                    json!({ "task_id": ctx.id, "status": "success", "duration": result.duration }),
                ));
                Ok(record)
            }
            ExecStatus::Timeout => {
                ctx.timed_out(error);
                Ok(record)
            }
            ExecStatus::Error => Err(run_error(result.permanent, error)),
        }
    }

    /// Runs `spec` for the attempt of `ctx`, its output and progress stored as it goes
    /// (`queue::logs`) and all of it stored before this returns. Its process starts only
    /// while the attempt holds its lease: `None` when it did not, the task given back.
    async fn run_logged(
        &self,
        ctx: &TaskContext,
        spec: &mut RunSpec,
    ) -> Result<Option<crate::executor::ExecutionResult>, HandlerError> {
        let lease = ctx.lease();
        spec.gate = Some(crate::executor::StartGate::new(move || lease.check()));
        let limit = self.executor.output_limit;
        let output = Arc::new(crate::executor::output::RunOutput::new(limit));
        spec.output = Some(output.clone());
        let writer = LogWriter::spawn(self.pool.clone(), ctx.id, ctx.attempt, output, limit);
        let result = self.executor.run(spec).await;
        writer.finish().await;
        match result {
            Ok(r) => Ok(Some(r)),
            Err(crate::executor::Error::NotStarted(why)) => {
                given_back(ctx, &why);
                Ok(None)
            }
            Err(e) => Err(setup_error(e)),
        }
    }

    /// The `agent` task kind.
    pub fn agent_handler(&self) -> Handler {
        let agents = self.clone();
        Handler::from_context(move |ctx| {
            let agents = agents.clone();
            async move { agents.run_agent(ctx).await }
        })
        .with_validation(validate_agent_payload)
    }

    /// The `command` task kind: payload `{"argv": [...], "input"?, "timeout_s"?, "env"?}`.
    pub fn command_handler(&self) -> Handler {
        let agents = self.clone();
        let executor = self.executor.clone();
        // The sandbox enforces the command's timeout; the pool's only backs it up.
        let backstop =
            Duration::from_secs(TIMEOUT_S.1) + executor.kill_grace + Duration::from_secs(10);
        Handler::from_context(move |ctx| {
            let agents = agents.clone();
            let executor = agents.executor.clone();
            async move {
                validate_command_payload(&ctx.payload).map_err(HandlerError::permanent)?;
                let argv: Vec<String> = serde_json::from_value(ctx.payload["argv"].clone())
                    .map_err(|_| {
                        HandlerError::permanent("payload.argv must be a list of strings")
                    })?;
                let mut spec = RunSpec::new(Runtime::Command { argv }, &executor);
                spec.input = ctx.payload.get("input").cloned().unwrap_or(Value::Null);
                if let Some(t) = crate::worker::whole(&ctx.payload["timeout_s"])
                    .and_then(|t| u64::try_from(t).ok())
                {
                    spec.timeout = Duration::from_secs(t.clamp(TIMEOUT_S.0, TIMEOUT_S.1));
                }
                if let Some(env) = ctx.payload.get("env") {
                    spec.env = serde_json::from_value(env.clone()).map_err(|_| {
                        HandlerError::permanent("payload.env must map names to strings")
                    })?;
                }
                spec.traceparent = ctx.traceparent.clone();
                let Some(result) = agents.run_logged(&ctx, &mut spec).await? else {
                    return Ok(Value::Null);
                };
                let record = serde_json::to_value(&result).expect("result serialises");
                match result.status {
                    ExecStatus::Success => Ok(record),
                    ExecStatus::Timeout => {
                        ctx.timed_out(result.error.unwrap_or_default());
                        Ok(record)
                    }
                    ExecStatus::Error => Err(run_error(
                        result.permanent,
                        result.error.unwrap_or_default(),
                    )),
                }
            }
        })
        .with_timeout(backstop)
        .with_validation(validate_command_payload)
    }
}

/// The agent an `agent` task enqueued by hand runs (its payload's `agent_id`), when it
/// exists: the task is then that agent's run, in its history and counted for its quarantine,
/// like one enqueued by `agents run`. (A run of an agent that does not exist ends
/// `cancelled`, saying so.)
pub async fn agent_of_payload(
    pool: &PgPool,
    kind: &str,
    payload: &Value,
) -> Result<Option<i64>, Error> {
    let Some(id) = (kind == AGENT_KIND)
        .then(|| crate::worker::whole(&payload["agent_id"]))
        .flatten()
    else {
        return Ok(None);
    };
    Ok(names_of(pool, &[id]).await?.contains_key(&id).then_some(id))
}

/// The queue an agent's runs wait in (`default` when it names none, or is gone).
pub async fn queue_of(pool: &PgPool, id: i64) -> Result<String, Error> {
    let q: Option<Option<String>> =
        sqlx::query_scalar("SELECT config->>'queue' FROM agents WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(q.flatten()
        .unwrap_or_else(|| crate::queue::DEFAULT_QUEUE.to_string()))
}

/// Checks an `agent` task's payload: `{"agent_id": <id>, "input"?: any}`.
pub fn validate_agent_payload(payload: &Value) -> Result<(), String> {
    match payload.get("agent_id") {
        Some(v) if crate::worker::whole(v).is_some() => Ok(()),
        Some(v) => Err(format!(
            "payload.agent_id must be an agent's id (an integer), not {v}"
        )),
        None => Err(
            "payload.agent_id is missing: an agent task names the agent by id (or use \
             `harness agents run <name>`, POST /api/agents/{id}/run)"
                .into(),
        ),
    }
}

/// Checks a `command` task's payload: `{"argv": [program, args...], "input"?: any,
/// "timeout_s"?: seconds, "env"?: {name: value}}`. Whether the program exists is checked
/// where the task runs: a missing one fails it at once, not retried.
pub fn validate_command_payload(payload: &Value) -> Result<(), String> {
    let argv: Vec<String> = serde_json::from_value(payload["argv"].clone())
        .map_err(|_| "payload.argv must be a list of strings: the program and its arguments")?;
    let Some(program) = argv.first() else {
        return Err("payload.argv is empty; give the program and its arguments".into());
    };
    if program.is_empty() {
        return Err("payload.argv[0] is empty; give the program".into());
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err("payload.argv holds a NUL character, which no argument can".into());
    }
    if let Some(t) = payload.get("timeout_s")
        && !crate::worker::whole(t)
            .is_some_and(|t| (TIMEOUT_S.0 as i64..=TIMEOUT_S.1 as i64).contains(&t))
    {
        return Err(format!(
            "payload.timeout_s must be whole seconds from {} to {}, not {t}",
            TIMEOUT_S.0, TIMEOUT_S.1
        ));
    }
    if let Some(env) = payload.get("env")
        && serde_json::from_value::<BTreeMap<String, String>>(env.clone()).is_err()
    {
        return Err("payload.env must map variable names to strings".into());
    }
    Ok(())
}

/// A run whose process was not started because another replica may have taken its task over:
/// the task goes back to the queue, the attempt not counted (if it is still this replica's).
fn given_back(ctx: &TaskContext, why: &str) {
    tracing::warn!(
        reason = why,
        "not starting the run; returning its task to the queue"
    );
    ctx.defer(Duration::ZERO);
}

/// A run that could not be set up: permanent when no retry can cure it (see
/// [`crate::executor::Error::is_permanent`]).
fn setup_error(e: crate::executor::Error) -> HandlerError {
    if e.is_permanent() {
        HandlerError::permanent(e.to_string())
    } else {
        HandlerError::Retryable(e.to_string())
    }
}

/// A run that failed: permanent when it said so.
fn run_error(permanent: bool, error: String) -> HandlerError {
    if permanent {
        HandlerError::Permanent(error)
    } else {
        HandlerError::Retryable(error)
    }
}

fn split_runtime(r: &Runtime) -> (RuntimeKind, Option<&str>, Option<&[String]>) {
    match r {
        Runtime::Python { code } => (RuntimeKind::Python, Some(code.as_str()), None),
        Runtime::Command { argv } => (RuntimeKind::Command, None, Some(argv.as_slice())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_own_config_over_its_bound_or_with_a_nul_is_refused_naming_the_field() {
        let mut c = AgentOwnConfig::new();
        c.insert("name".into(), json!("Ada"));
        assert!(validate_own_config(&c).is_ok());
        c.insert(
            "big".into(),
            json!("x".repeat(crate::bounds::AGENT_CONFIG_BYTES)),
        );
        let e = validate_own_config(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("invalid config: is ") && e.contains("allowed up to 65536"),
            "{e}"
        );
        let mut c = AgentOwnConfig::new();
        c.insert("k".into(), json!("a\u{0}b"));
        let e = validate_own_config(&c).unwrap_err().to_string();
        assert!(e.contains("NUL"), "{e}");
    }

    use super::*;

    #[test]
    fn a_runtime_kind_without_what_it_runs_is_refused() {
        let refused = |kind, code: Option<&str>, argv: Option<Vec<String>>| match runtime_from(
            kind,
            code.map(str::to_string),
            argv,
        ) {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(RuntimeKind::Python, None, Some(vec!["x".into()])),
            "code"
        );
        assert_eq!(refused(RuntimeKind::Command, Some("x"), None), "command");
        assert!(matches!(
            runtime_from(RuntimeKind::Command, None, Some(vec!["true".into()])),
            Ok(Runtime::Command { .. })
        ));
    }
}
