//! The types of the `tasks` table as callers see them: a task to enqueue ([`NewTask`], its
//! validation at the edge), what an enqueue did ([`Enqueued`]), the stored record ([`Task`]),
//! a claimed attempt ([`Claimed`]), counts ([`Stats`]) and listing filters ([`TaskFilter`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

use super::{
    DEFAULT_QUEUE, Error, MAX_KEY_LEN, MAX_KIND_LEN, MAX_PAYLOAD_BYTES, MAX_QUEUE_LEN, MAX_RETRIES,
    Status, TaskId,
};

/// The serialised size of `v`, without building the string.
pub(super) fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// A task to enqueue. Built with [`NewTask::new`] and its option methods.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub kind: String,
    pub payload: Value,
    pub priority: i32,
    pub run_at: Option<DateTime<Utc>>,
    pub delay: Option<Duration>,
    pub max_retries: Option<u32>,
    pub idempotency_key: Option<String>,
    pub agent_id: Option<i64>,
    pub timeout: Option<Duration>,
    pub fire_at: Option<DateTime<Utc>>,
    pub traceparent: Option<String>,
    /// The queue it waits in ([`DEFAULT_QUEUE`] unless named).
    pub queue: String,
    /// What limits of scope `key` count it under (a customer, a tenant).
    pub concurrency_key: Option<String>,
}

impl NewTask {
    pub fn new(kind: impl Into<String>, payload: Value) -> NewTask {
        NewTask {
            kind: kind.into(),
            payload,
            priority: 0,
            run_at: None,
            delay: None,
            max_retries: None,
            idempotency_key: None,
            agent_id: None,
            timeout: None,
            fire_at: None,
            traceparent: None,
            queue: DEFAULT_QUEUE.to_string(),
            concurrency_key: None,
        }
    }
    /// What limits of scope `key` count it under (e.g. the customer it works for).
    pub fn concurrency_key(mut self, k: impl Into<String>) -> Self {
        self.concurrency_key = Some(k.into());
        self
    }
    /// The queue it waits in (default [`DEFAULT_QUEUE`]): only replicas that serve it run it.
    pub fn queue(mut self, q: impl Into<String>) -> Self {
        self.queue = q.into();
        self
    }
    /// Higher runs first (default 0).
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = p;
        self
    }
    /// Not claimed before `at`.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }
    /// Not claimed before `d` from now (measured by the database clock).
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
    /// Retries after the first attempt (default `bulk.retry_attempts`).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = Some(n);
        self
    }
    /// At most one task per key, for ever: a second enqueue returns the first task.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
    pub fn agent_id(mut self, id: i64) -> Self {
        self.agent_id = Some(id);
        self
    }
    /// Overrides the kind's default timeout for this task.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }
    /// The cron tick this run belongs to (unique per agent).
    pub fn fire_at(mut self, at: DateTime<Utc>) -> Self {
        self.fire_at = Some(at);
        self
    }
    pub fn traceparent(mut self, tp: impl Into<String>) -> Self {
        self.traceparent = Some(tp.into());
        self
    }

    /// Checks every field against its bounds; the error names the first field refused.
    pub(super) fn validate(&self) -> Result<(), Error> {
        self.validate_kind()?;
        validate_queue_name(&self.queue).map_err(|reason| invalid("queue", reason))?;
        self.validate_payload()?;
        self.validate_texts()?;
        self.validate_numbers()
    }

    fn validate_kind(&self) -> Result<(), Error> {
        let kind_ok = !self.kind.is_empty()
            && self.kind.len() <= MAX_KIND_LEN
            && self
                .kind
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
        if kind_ok {
            return Ok(());
        }
        Err(invalid(
            "kind",
            format!(
                "{:?} must be 1 to {MAX_KIND_LEN} characters of letters, digits, _ - . :",
                self.kind
            ),
        ))
    }

    /// Small enough, and nothing in it that PostgreSQL cannot store as given.
    fn validate_payload(&self) -> Result<(), Error> {
        let size = json_len(&self.payload);
        if size > MAX_PAYLOAD_BYTES {
            return Err(invalid(
                "payload",
                format!(
                    "is {size} bytes; at most {MAX_PAYLOAD_BYTES} bytes are accepted (store large \
                     data elsewhere and pass a reference)"
                ),
            ));
        }
        let at = |path: String| {
            if path.is_empty() {
                "its top level".to_string()
            } else {
                path
            }
        };
        if let Some(path) = crate::db::text::find_nul(&self.payload) {
            return Err(invalid(
                "payload",
                format!(
                    "holds a NUL character (\\u0000) at {}, which cannot be stored",
                    at(path)
                ),
            ));
        }
        if let Some(path) = crate::db::text::find_unreadable_number(&self.payload) {
            return Err(invalid(
                "payload",
                format!(
                    "holds a number beyond ±{:e} at {}, which cannot be stored exactly",
                    crate::db::text::MAX_NUMBER,
                    at(path)
                ),
            ));
        }
        Ok(())
    }

    fn validate_texts(&self) -> Result<(), Error> {
        let nul = "holds a NUL character, which is not allowed";
        if let Some(k) = &self.idempotency_key {
            if crate::db::text::has_nul(k) {
                return Err(invalid("idempotency_key", nul));
            }
            if k.is_empty() || k.chars().count() > MAX_KEY_LEN {
                return Err(invalid(
                    "idempotency_key",
                    format!("must be 1 to {MAX_KEY_LEN} characters"),
                ));
            }
        }
        if let Some(k) = &self.concurrency_key
            && (k.is_empty() || k.chars().count() > MAX_KEY_LEN || crate::db::text::has_nul(k))
        {
            return Err(invalid(
                "concurrency_key",
                format!("must be 1 to {MAX_KEY_LEN} characters, without NUL"),
            ));
        }
        if self
            .traceparent
            .as_deref()
            .is_some_and(crate::db::text::has_nul)
        {
            return Err(invalid("traceparent", nul));
        }
        Ok(())
    }

    fn validate_numbers(&self) -> Result<(), Error> {
        if self.max_retries.is_some_and(|n| n > MAX_RETRIES) {
            return Err(invalid(
                "max_retries",
                format!("must be 0 to {MAX_RETRIES}"),
            ));
        }
        let (shortest, longest) = crate::bounds::TASK_TIMEOUT;
        if self.timeout.is_some_and(|t| t < shortest || t > longest) {
            return Err(invalid("timeout", "must be between 1 ms and 7 days"));
        }
        if self.delay.is_some_and(|d| d > crate::bounds::MAX_DELAY) {
            return Err(invalid("delay", "must be at most a year"));
        }
        if self.delay.is_some() && self.run_at.is_some() {
            return Err(invalid(
                "delay",
                "give either a delay or a run-at time, not both",
            ));
        }
        Ok(())
    }
}

/// A queue's name: 1 to [`MAX_QUEUE_LEN`] characters of letters, digits, `_ - . :`.
pub fn validate_queue_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_QUEUE_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be 1 to {MAX_QUEUE_LEN} characters of letters, digits, _ - . :"
        ))
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        reason: reason.into(),
    }
}

/// What an enqueue did: a new task, or the existing one its idempotency key names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Enqueued {
    pub id: TaskId,
    pub status: Status,
    pub deduplicated: bool,
}

/// How an attempt that did not succeed ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptStatus {
    Failed,
    Timeout,
    Cancelled,
    /// Its replica stopped heartbeating and the task was rescued.
    Lost,
}

impl AttemptStatus {
    pub const ALL: [AttemptStatus; 4] = [
        AttemptStatus::Failed,
        AttemptStatus::Timeout,
        AttemptStatus::Cancelled,
        AttemptStatus::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptStatus::Failed => "failed",
            AttemptStatus::Timeout => "timeout",
            AttemptStatus::Cancelled => "cancelled",
            AttemptStatus::Lost => "lost",
        }
    }
}

/// One attempt that did not succeed, as kept in `tasks.attempts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AttemptRecord {
    pub attempt: i32,
    pub status: AttemptStatus,
    pub error: Option<String>,
    /// The replica that ran it.
    pub replica: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: DateTime<Utc>,
}

/// The whole stored record of a task.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct Task {
    pub id: TaskId,
    pub kind: String,
    /// The queue it waits in.
    pub queue: String,
    /// What limits of scope `key` count it under.
    pub concurrency_key: Option<String>,
    pub agent_id: Option<i64>,
    pub status: Status,
    pub payload: Value,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub priority: i32,
    pub attempt: i32,
    pub retry_count: i32,
    pub max_retries: i32,
    pub timeout_ms: Option<i64>,
    pub idempotency_key: Option<String>,
    pub fire_at: Option<DateTime<Utc>>,
    pub scheduled_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// The replica running it (`locked_by`).
    #[sqlx(rename = "locked_by")]
    pub replica: Option<String>,
    /// One entry per attempt that did not succeed, oldest first.
    #[sqlx(json)]
    pub attempts: Vec<AttemptRecord>,
    pub cancel_requested: bool,
    pub traceparent: Option<String>,
    /// The latest progress its run reported (on one task, not in listings).
    #[sqlx(skip)]
    #[serde(default)]
    pub progress: Option<super::logs::TaskProgress>,
}

pub(super) const TASK_COLUMNS: &str = "id, kind, queue, concurrency_key, agent_id, status, payload, result, error, priority, attempt, \
    retry_count, max_retries, timeout_ms, idempotency_key, fire_at, scheduled_at, started_at, \
    completed_at, created_at, locked_by, attempts, cancel_requested, traceparent";

/// A task a replica has claimed and must run, then report with [`Queue::complete`].
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: TaskId,
    pub kind: String,
    pub queue: String,
    pub payload: Value,
    pub priority: i32,
    pub attempt: i32,
    pub retry_count: i32,
    pub max_retries: i32,
    pub timeout_ms: Option<i64>,
    pub agent_id: Option<i64>,
    pub traceparent: Option<String>,
    pub scheduled_at: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
}

/// Counts per status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub total: i64,
    pub by_status: HashMap<Status, i64>,
    /// Completed as a percentage of finished tasks (completed + failed + timeout).
    pub success_rate: f64,
}

impl Stats {
    pub fn count(&self, s: Status) -> i64 {
        self.by_status.get(&s).copied().unwrap_or(0)
    }
}

/// Filters of a task listing; newest first.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub status: Option<Status>,
    pub kind: Option<String>,
    pub agent_id: Option<i64>,
    /// Keyset pagination: only tasks with a smaller id (the primary key walks there).
    pub before: Option<TaskId>,
    /// Only tasks with a larger id: with `before`, a window of ids the primary key bounds,
    /// so that a filter no index serves reads a bounded number of rows.
    pub after: Option<TaskId>,
    pub limit: i64,
    pub offset: i64,
}
