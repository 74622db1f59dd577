//! The `tasks` table: enqueue, claim, complete, retry, rescue, release, cancel, prune.
//!
//! Every lifecycle transition is one SQL statement:
//!
//! ```text
//! pending ──claim──▶ running ──complete──▶ completed | failed | timeout | cancelled
//!    ▲                  │ └──fail, retries left──▶ retry_scheduled ──(backoff)──▶ claim
//!    └──release/rescue──┘
//! ```
//!
//! Guarantees:
//! - an idempotency key names one task: enqueueing it again returns the existing task, and a
//!   completed task is never run again;
//! - a claim never returns more rows than asked for, in `priority DESC, scheduled_at, id`
//!   order, skipping rows other replicas hold (`FOR UPDATE SKIP LOCKED`);
//! - a completion is fenced by `locked_by` and `attempt`: a stale attempt (rescued and rerun
//!   elsewhere) can never overwrite the newer one;
//! - one `NOTIFY` per enqueue statement wakes idle replicas.
//!
//! The queue never runs user code; the `pool` does, and reports back through [`Queue::complete`].

pub mod backoff;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

/// The channel replicas `LISTEN` on for new work.
pub const TASKS_CHANNEL: &str = "harness_tasks";
/// The channel that tells a task's owner to abort it.
pub const CANCEL_CHANNEL: &str = "harness_cancel";

pub type TaskId = i64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("task {0} not found")]
    NotFound(TaskId),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("task {id} is {status}; {action} needs {allowed}")]
    WrongState {
        id: TaskId,
        status: Status,
        action: &'static str,
        allowed: &'static str,
    },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// Where a task is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Running,
    Completed,
    Failed,
    Timeout,
    RetryScheduled,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Pending,
        Status::Running,
        Status::Completed,
        Status::Failed,
        Status::Timeout,
        Status::RetryScheduled,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Timeout => "timeout",
            Status::RetryScheduled => "retry_scheduled",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No further transition happens on its own from here.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Failed | Status::Timeout | Status::Cancelled
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl sqlx::Type<sqlx::Postgres> for Status {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <String as sqlx::Type<sqlx::Postgres>>::type_info()
    }
    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <String as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for Status {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let s = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
        Status::parse(s).ok_or_else(|| format!("unknown task status {s:?}").into())
    }
}

/// Longest idempotency key accepted, in characters.
pub const MAX_KEY_LEN: usize = 512;
/// Most retries a task may ask for.
pub const MAX_RETRIES: u32 = 1000;
/// Longest kind name accepted.
pub const MAX_KIND_LEN: usize = 128;
/// Largest payload accepted, serialised: the queue carries work descriptions, not data.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

/// The serialised size of `v`, without building the string.
fn json_len(v: &Value) -> usize {
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
        }
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

    fn validate(&self) -> Result<(), Error> {
        let kind_ok = !self.kind.is_empty()
            && self.kind.len() <= MAX_KIND_LEN
            && self
                .kind
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
        if !kind_ok {
            return Err(Error::Invalid {
                field: "kind",
                reason: format!(
                    "{:?} must be 1 to {MAX_KIND_LEN} characters of letters, digits, _ - . :",
                    self.kind
                ),
            });
        }
        let size = json_len(&self.payload);
        if size > MAX_PAYLOAD_BYTES {
            return Err(Error::Invalid {
                field: "payload",
                reason: format!(
                    "is {size} bytes; at most {MAX_PAYLOAD_BYTES} bytes are accepted (store large \
                     data elsewhere and pass a reference)"
                ),
            });
        }
        if let Some(path) = crate::db::text::find_nul(&self.payload) {
            return Err(Error::Invalid {
                field: "payload",
                reason: format!(
                    "holds a NUL character (\\u0000) at {}, which cannot be stored",
                    if path.is_empty() {
                        "its top level"
                    } else {
                        path.as_str()
                    }
                ),
            });
        }
        if let Some(path) = crate::db::text::find_unreadable_number(&self.payload) {
            return Err(Error::Invalid {
                field: "payload",
                reason: format!(
                    "holds a number beyond ±{:e} at {}, which cannot be stored exactly",
                    crate::db::text::MAX_NUMBER,
                    if path.is_empty() {
                        "its top level"
                    } else {
                        path.as_str()
                    }
                ),
            });
        }
        if let Some(k) = &self.idempotency_key
            && crate::db::text::has_nul(k)
        {
            return Err(Error::Invalid {
                field: "idempotency_key",
                reason: "holds a NUL character, which is not allowed".into(),
            });
        }
        if self
            .traceparent
            .as_deref()
            .is_some_and(crate::db::text::has_nul)
        {
            return Err(Error::Invalid {
                field: "traceparent",
                reason: "holds a NUL character, which is not allowed".into(),
            });
        }
        if let Some(k) = &self.idempotency_key
            && (k.is_empty() || k.chars().count() > MAX_KEY_LEN)
        {
            return Err(Error::Invalid {
                field: "idempotency_key",
                reason: format!("must be 1 to {MAX_KEY_LEN} characters"),
            });
        }
        if self.max_retries.is_some_and(|n| n > MAX_RETRIES) {
            return Err(Error::Invalid {
                field: "max_retries",
                reason: format!("must be 0 to {MAX_RETRIES}"),
            });
        }
        if self
            .timeout
            .is_some_and(|t| t < Duration::from_millis(1) || t > Duration::from_secs(7 * 86_400))
        {
            return Err(Error::Invalid {
                field: "timeout",
                reason: "must be between 1 ms and 7 days".into(),
            });
        }
        if self.delay.is_some() && self.run_at.is_some() {
            return Err(Error::Invalid {
                field: "delay",
                reason: "give either a delay or a run-at time, not both".into(),
            });
        }
        Ok(())
    }
}

/// What an enqueue did: a new task, or the existing one its idempotency key names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Enqueued {
    pub id: TaskId,
    pub status: Status,
    pub deduplicated: bool,
}

/// The whole stored record of a task.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct Task {
    pub id: TaskId,
    pub kind: String,
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
    /// One entry per attempt that did not succeed.
    pub attempts: Value,
    pub cancel_requested: bool,
    pub traceparent: Option<String>,
}

const TASK_COLUMNS: &str = "id, kind, agent_id, status, payload, result, error, priority, attempt, \
    retry_count, max_retries, timeout_ms, idempotency_key, fire_at, scheduled_at, started_at, \
    completed_at, created_at, locked_by, attempts, cancel_requested, traceparent";

/// A task a replica has claimed and must run, then report with [`Queue::complete`].
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: TaskId,
    pub kind: String,
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

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success(Value),
    /// The handler returned an error (or panicked); retried while retries remain.
    Failed(String),
    /// The attempt ran out of time; retried while retries remain.
    TimedOut(String),
    /// Aborted because someone cancelled the task; never retried.
    Cancelled,
    /// Not run, on purpose (e.g. an agent's previous run still runs); ends `cancelled`
    /// with the reason as its error. Never retried.
    Skipped(String),
    /// Not run now: back to `pending` after the delay, the attempt not counted.
    Deferred(Duration),
}

/// The report of one finished attempt.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: TaskId,
    pub attempt: i32,
    pub outcome: Outcome,
    /// When to retry, should this attempt have failed with retries left.
    pub retry_at: DateTime<Utc>,
    /// An agent's next state, written in the same transaction if the completion applies.
    pub handoff: Option<crate::handoff::HandoffWrite>,
}

/// A completion as it is written: every NUL of its output replaced (PostgreSQL cannot store
/// one), borrowing the original when there was none.
struct CompletionRow<'a> {
    id: TaskId,
    attempt: i32,
    ok: bool,
    retryable: bool,
    result: Option<std::borrow::Cow<'a, Value>>,
    error: Option<std::borrow::Cow<'a, str>>,
    final_status: Status,
    retry_at: DateTime<Utc>,
    handoff: Option<std::borrow::Cow<'a, crate::handoff::HandoffWrite>>,
}

impl<'a> CompletionRow<'a> {
    /// `None` for a deferred attempt, which is not a completion.
    fn of(c: &'a Completion) -> Option<CompletionRow<'a>> {
        use std::borrow::Cow;
        let storable_text = |s: &'a str| -> Cow<'a, str> {
            if crate::db::text::has_nul(s) {
                Cow::Owned(crate::db::text::replace_nul_str(s))
            } else {
                Cow::Borrowed(s)
            }
        };
        let (ok, retryable, result, error, final_status) = match &c.outcome {
            Outcome::Success(v) => {
                let v = if crate::db::text::needs_change(v) {
                    let mut v = v.clone();
                    crate::db::text::make_storable(&mut v);
                    Cow::Owned(v)
                } else {
                    Cow::Borrowed(v)
                };
                (true, false, Some(v), None, Status::Completed)
            }
            Outcome::Failed(e) => (false, true, None, Some(storable_text(e)), Status::Failed),
            Outcome::TimedOut(e) => (false, true, None, Some(storable_text(e)), Status::Timeout),
            Outcome::Cancelled => (
                false,
                false,
                None,
                Some(Cow::Borrowed("cancelled")),
                Status::Cancelled,
            ),
            Outcome::Skipped(reason) => (
                false,
                false,
                None,
                Some(storable_text(reason)),
                Status::Cancelled,
            ),
            Outcome::Deferred(_) => return None,
        };
        let handoff = c.handoff.as_ref().map(|h| {
            let dirty = crate::db::text::needs_change(&h.state)
                || crate::db::text::needs_change(&h.metadata)
                || h.summary.as_deref().is_some_and(crate::db::text::has_nul);
            if dirty {
                let mut h = h.clone();
                crate::db::text::make_storable(&mut h.state);
                crate::db::text::make_storable(&mut h.metadata);
                h.summary = h.summary.as_deref().map(crate::db::text::replace_nul_str);
                Cow::Owned(h)
            } else {
                Cow::Borrowed(h)
            }
        });
        Some(CompletionRow {
            id: c.id,
            attempt: c.attempt,
            ok,
            retryable,
            result,
            error,
            final_status,
            retry_at: c.retry_at,
            handoff,
        })
    }

    /// The row the database refused, as a final failure with `reason` and nothing else.
    fn refused(row: &CompletionRow<'_>, reason: &str) -> CompletionRow<'static> {
        CompletionRow {
            id: row.id,
            attempt: row.attempt,
            ok: false,
            retryable: false,
            result: None,
            error: Some(std::borrow::Cow::Owned(reason.to_string())),
            final_status: Status::Failed,
            retry_at: row.retry_at,
            handoff: None,
        }
    }
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

/// Handle on the task queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Queue {
    pool: PgPool,
    default_max_retries: u32,
}

const INSERT_ONE: &str = "
WITH ins AS (
    INSERT INTO tasks (kind, payload, priority, scheduled_at, max_retries, idempotency_key,
                       agent_id, timeout_ms, fire_at, traceparent)
    VALUES ($1, $2, $3, COALESCE($4, now() + make_interval(secs => $5::double precision)),
            $6, $7, $8, $9, $10, $11)
    ON CONFLICT DO NOTHING
    RETURNING id, status
)
SELECT ins.id, ins.status FROM ins, (SELECT pg_notify('harness_tasks', '')) AS n";

// One statement for the whole batch; rows come back in input order because `nextval` is
// drawn as the ordered SELECT produces them.
const INSERT_MANY: &str = "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::timestamptz[],
                         $5::double precision[], $6::int[], $7::text[], $8::bigint[],
                         $9::bigint[], $10::timestamptz[], $11::text[])
        WITH ORDINALITY AS t(kind, payload, priority, run_at, delay_s, max_retries,
                             idempotency_key, agent_id, timeout_ms, fire_at, traceparent, ord)
), ins AS (
    INSERT INTO tasks (kind, payload, priority, scheduled_at, max_retries, idempotency_key,
                       agent_id, timeout_ms, fire_at, traceparent)
    SELECT kind, payload, priority,
           COALESCE(run_at, now() + make_interval(secs => delay_s)),
           max_retries, idempotency_key, agent_id, timeout_ms, fire_at, traceparent
    FROM input ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id, status, idempotency_key, agent_id, fire_at
)
SELECT ins.id, ins.status, ins.idempotency_key, ins.agent_id, ins.fire_at
FROM ins, (SELECT pg_notify('harness_tasks', '')) AS n";

// The claim. The inner SELECT walks tasks_claim_idx (partial on the claimable statuses,
// ordered like this); `id = ANY(ARRAY(...))` makes the UPDATE look rows up by primary key
// (a join here gets planned as a hash join over a sequential scan of the whole table).
const CLAIM: &str = "
UPDATE tasks t
SET status = 'running', locked_by = $1, attempt = t.attempt + 1, started_at = now()
WHERE t.id = ANY(ARRAY(
    SELECT id FROM tasks
    WHERE status IN ('pending', 'retry_scheduled') AND scheduled_at <= now()
      AND kind = ANY($3)
    ORDER BY priority DESC, scheduled_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED))
RETURNING t.id, t.kind, t.payload, t.priority, t.attempt, t.retry_count, t.max_retries,
          t.timeout_ms, t.agent_id, t.traceparent, t.scheduled_at, t.started_at";

// Batched completion, fenced by owner and attempt: a stale attempt matches no row.
// `ok` rows complete; failed rows retry while retries remain, else take `final_status`.
// Only a running task has `locked_by` set (claim sets it; complete, release and rescue clear
// it), so the owner check is the status check too. Leaving `status = 'running'` out is
// deliberate: with it the planner probes tasks_status_idx, whose entries for finished rows
// pile up between vacuums, and every batch slows with the churn; without it, each input row
// is one primary-key lookup.
const COMPLETE: &str = "
UPDATE tasks t SET
    status = CASE
        WHEN u.ok THEN 'completed'
        WHEN u.retryable AND t.retry_count < t.max_retries THEN 'retry_scheduled'
        ELSE u.final_status END,
    result = CASE WHEN u.ok THEN u.result ELSE t.result END,
    error = CASE WHEN u.ok THEN NULL ELSE u.error END,
    retry_count = t.retry_count
        + CASE WHEN NOT u.ok AND u.retryable AND t.retry_count < t.max_retries THEN 1 ELSE 0 END,
    scheduled_at = CASE WHEN NOT u.ok AND u.retryable AND t.retry_count < t.max_retries
        THEN u.retry_at ELSE t.scheduled_at END,
    completed_at = CASE WHEN NOT u.ok AND u.retryable AND t.retry_count < t.max_retries
        THEN NULL ELSE now() END,
    locked_by = NULL,
    cancel_requested = false,
    attempts = CASE WHEN u.ok THEN t.attempts ELSE t.attempts || jsonb_build_array(
        jsonb_build_object('attempt', t.attempt, 'status', u.final_status, 'error', u.error,
                           'replica', t.locked_by, 'started_at', t.started_at, 'ended_at', now()))
        END
FROM unnest($1::bigint[], $2::int[], $3::bool[], $4::bool[], $5::jsonb[], $6::text[],
            $7::text[], $8::timestamptz[])
    AS u(id, attempt, ok, retryable, result, error, final_status, retry_at)
WHERE t.id = u.id AND t.attempt = u.attempt AND t.locked_by = $9
RETURNING t.id";

// The hot statements' plans must not depend on table statistics, which lag behind a queue's
// churn (a bulk load is not analyzed for up to a minute). Each runs in a transaction with
// these planner settings, local to it (`set_config(.., true)` is SET LOCAL).
//
// CLAIM walks tasks_claim_idx in order and stops after LIMIT rows. Without statistics the
// planner expects a handful of rows and prefers a bitmap scan that fetches and sorts the
// whole backlog: 10 ms per claim for 20k waiting tasks, growing with the backlog (measured).
const CLAIM_PLAN: &str =
    "SELECT set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true)";
// COMPLETE's generic plan sees `unnest` as a few rows and probes the primary key once per
// input row, whatever the batch size. A custom plan made with the real array size and stale
// statistics for `locked_by` can pick a sequential scan in a nested loop: 700 ms for a
// 1024-row batch (measured).
const COMPLETE_PLAN: &str = "SELECT set_config('plan_cache_mode', 'force_generic_plan', true)";

async fn pin_plan(conn: &mut PgConnection, settings: &'static str) -> Result<(), Error> {
    sqlx::query(settings).execute(conn).await?;
    Ok(())
}

// Tasks of replicas whose heartbeat is too old go back (the lost attempt counts as a retry).
// Matches tasks_status_idx (status = 'running').
// Staleness counts from the later of the last heartbeat and the server's start: after a
// restart no replica could heartbeat while the server was down, so each gets `rescue_after`
// from the restart to reconnect before its tasks are judged lost. (An outage without a restart
// is covered by the rescuer itself: see the replica's rescuer, which waits for its own
// heartbeats to have succeeded for `rescue_after`.)
const RESCUE: &str = "
UPDATE tasks t SET
    status = CASE WHEN t.cancel_requested THEN 'cancelled'
                  WHEN t.retry_count < t.max_retries THEN 'pending' ELSE 'failed' END,
    retry_count = LEAST(t.retry_count + 1, t.max_retries),
    error = 'replica ' || t.locked_by || ' stopped heartbeating while running this task',
    completed_at = CASE WHEN NOT t.cancel_requested AND t.retry_count < t.max_retries
                        THEN NULL ELSE now() END,
    cancel_requested = false,
    attempts = t.attempts || jsonb_build_array(jsonb_build_object(
        'attempt', t.attempt, 'status', 'lost', 'replica', t.locked_by,
        'error', 'replica stopped heartbeating', 'started_at', t.started_at, 'ended_at', now())),
    locked_by = NULL
WHERE t.status = 'running'
  AND NOT EXISTS (
      SELECT 1 FROM replicas r
      WHERE r.id = t.locked_by
        AND GREATEST(r.heartbeat_at, pg_postmaster_start_time())
            > now() - make_interval(secs => $1))
RETURNING t.id";

impl Queue {
    pub fn new(pool: PgPool, default_max_retries: u32) -> Queue {
        Queue {
            pool,
            default_max_retries,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Enqueues one task; with an idempotency key that exists, returns that task instead.
    pub async fn enqueue(&self, task: NewTask) -> Result<Enqueued, Error> {
        let mut conn = self.pool.acquire().await?;
        self.enqueue_in(&mut conn, task).await
    }

    /// [`Queue::enqueue`] on the caller's connection or transaction: the task exists only if
    /// the caller's transaction commits (and the wake-up is sent only then).
    pub async fn enqueue_in(
        &self,
        conn: &mut PgConnection,
        task: NewTask,
    ) -> Result<Enqueued, Error> {
        use tracing::Instrument;
        let span = tracing::info_span!("queue.enqueue", task.kind = %task.kind);
        self.enqueue_one(conn, task).instrument(span).await
    }

    async fn enqueue_one(
        &self,
        conn: &mut PgConnection,
        mut task: NewTask,
    ) -> Result<Enqueued, Error> {
        task.validate()?;
        // The task's run becomes a child of this span, wherever it runs.
        if task.traceparent.is_none() {
            task.traceparent = crate::telemetry::current_traceparent();
        }
        // A conflict names an existing task; if that task is pruned before we read it,
        // insert again (a few times at most: a pruned key is not re-pruned at once).
        for _ in 0..3 {
            let row: Option<(TaskId, Status)> = sqlx::query_as(INSERT_ONE)
                .bind(&task.kind)
                .bind(&task.payload)
                .bind(task.priority)
                .bind(task.run_at)
                .bind(task.delay.unwrap_or_default().as_secs_f64())
                .bind(task.max_retries.unwrap_or(self.default_max_retries) as i32)
                .bind(&task.idempotency_key)
                .bind(task.agent_id)
                .bind(task.timeout.map(|t| t.as_millis() as i64))
                .bind(task.fire_at)
                .bind(&task.traceparent)
                .fetch_optional(&mut *conn)
                .await?;
            if let Some((id, status)) = row {
                crate::telemetry::metrics()
                    .enqueued
                    .add(1, &crate::telemetry::task_attrs(&task.kind, task.agent_id));
                return Ok(Enqueued {
                    id,
                    status,
                    deduplicated: false,
                });
            }
            // The key or the agent's cron tick (either may have conflicted) names a task.
            let existing: Option<(TaskId, Status)> = sqlx::query_as(
                "SELECT id, status FROM tasks \
                 WHERE idempotency_key = $1 OR (agent_id = $2 AND fire_at = $3) LIMIT 1",
            )
            .bind(&task.idempotency_key)
            .bind(task.agent_id)
            .bind(task.fire_at)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some((id, status)) = existing {
                return Ok(Enqueued {
                    id,
                    status,
                    deduplicated: true,
                });
            }
        }
        Err(Error::Invalid {
            field: "idempotency_key",
            reason: "conflicted with a task that kept disappearing; try again".into(),
        })
    }

    /// Enqueues many tasks in one statement. A duplicate key (in the table or within the
    /// batch) does not fail the batch: its entry reports the existing task, `deduplicated`.
    /// Results are in input order.
    pub async fn enqueue_many(&self, tasks: Vec<NewTask>) -> Result<Vec<Enqueued>, Error> {
        // One transaction: if mapping the duplicates fails, no row stays behind for a
        // caller's retry to duplicate.
        let mut tx = self.pool.begin().await?;
        let out = self.enqueue_many_in(&mut tx, tasks).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// [`Queue::enqueue_many`] inside the caller's transaction.
    pub async fn enqueue_many_in(
        &self,
        conn: &mut PgConnection,
        tasks: Vec<NewTask>,
    ) -> Result<Vec<Enqueued>, Error> {
        use tracing::Instrument;
        let kinds: Vec<String> = tasks.iter().map(|t| t.kind.clone()).collect();
        let span = tracing::info_span!("queue.enqueue_many", tasks = kinds.len());
        let out = async {
            let tp = crate::telemetry::current_traceparent();
            let tasks = tasks
                .into_iter()
                .map(|mut t| {
                    if t.traceparent.is_none() {
                        t.traceparent = tp.clone();
                    }
                    t
                })
                .collect();
            self.insert_many(conn, tasks).await
        }
        .instrument(span)
        .await?;
        let mut per_kind: HashMap<&str, u64> = HashMap::new();
        for (k, e) in kinds.iter().zip(&out) {
            if !e.deduplicated {
                *per_kind.entry(k.as_str()).or_default() += 1;
            }
        }
        for (k, c) in per_kind {
            crate::telemetry::metrics()
                .enqueued
                .add(c, &crate::telemetry::kind(k));
        }
        Ok(out)
    }

    async fn insert_many(
        &self,
        conn: &mut PgConnection,
        tasks: Vec<NewTask>,
    ) -> Result<Vec<Enqueued>, Error> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        for t in &tasks {
            t.validate()?;
        }
        let n = tasks.len();
        let mut kind = Vec::with_capacity(n);
        let mut payload = Vec::with_capacity(n);
        let mut priority = Vec::with_capacity(n);
        let mut run_at = Vec::with_capacity(n);
        let mut delay_s = Vec::with_capacity(n);
        let mut max_retries = Vec::with_capacity(n);
        let mut key = Vec::with_capacity(n);
        let mut agent = Vec::with_capacity(n);
        let mut timeout = Vec::with_capacity(n);
        let mut fire = Vec::with_capacity(n);
        let mut trace = Vec::with_capacity(n);
        for t in &tasks {
            kind.push(t.kind.as_str());
            payload.push(&t.payload);
            priority.push(t.priority);
            run_at.push(t.run_at);
            delay_s.push(t.delay.unwrap_or_default().as_secs_f64());
            max_retries.push(t.max_retries.unwrap_or(self.default_max_retries) as i32);
            key.push(t.idempotency_key.as_deref());
            agent.push(t.agent_id);
            timeout.push(t.timeout.map(|d| d.as_millis() as i64));
            fire.push(t.fire_at);
            trace.push(t.traceparent.as_deref());
        }
        type Row = (
            TaskId,
            Status,
            Option<String>,
            Option<i64>,
            Option<DateTime<Utc>>,
        );
        let mut inserted: Vec<Row> = sqlx::query_as(INSERT_MANY)
            .bind(&kind)
            .bind(&payload)
            .bind(&priority)
            .bind(&run_at)
            .bind(&delay_s)
            .bind(&max_retries)
            .bind(&key)
            .bind(&agent)
            .bind(&timeout)
            .bind(&fire)
            .bind(&trace)
            .fetch_all(&mut *conn)
            .await?;
        // Ids were drawn in input order; RETURNING itself promises no order.
        inserted.sort_unstable_by_key(|r| r.0);

        if inserted.len() == n {
            return Ok(inserted
                .into_iter()
                .map(|(id, status, ..)| Enqueued {
                    id,
                    status,
                    deduplicated: false,
                })
                .collect());
        }

        // Some entries hit an existing key or cron tick. Inserted rows are in input order,
        // so walk the input: the first entry of each key that was inserted takes its row.
        let mut by_key: HashMap<String, (TaskId, Status)> = HashMap::new();
        let mut by_fire: HashMap<(i64, DateTime<Utc>), (TaskId, Status)> = HashMap::new();
        let mut plain = Vec::new();
        for (id, status, k, a, f) in &inserted {
            match (k, a, f) {
                (Some(k), _, _) => {
                    by_key.insert(k.clone(), (*id, *status));
                }
                (None, Some(a), Some(f)) => {
                    by_fire.insert((*a, *f), (*id, *status));
                }
                _ => plain.push((*id, *status)),
            }
        }
        let missing_keys: Vec<&str> = tasks
            .iter()
            .filter_map(|t| t.idempotency_key.as_deref())
            .filter(|k| !by_key.contains_key(*k))
            .collect();
        let mut existing_key: HashMap<String, (TaskId, Status)> = HashMap::new();
        if !missing_keys.is_empty() {
            let rows: Vec<(TaskId, Status, String)> = sqlx::query_as(
                "SELECT id, status, idempotency_key FROM tasks WHERE idempotency_key = ANY($1)",
            )
            .bind(&missing_keys)
            .fetch_all(&mut *conn)
            .await?;
            existing_key = rows.into_iter().map(|(i, s, k)| (k, (i, s))).collect();
        }
        let mut plain = plain.into_iter();
        let mut seen_key: std::collections::HashSet<&str> = Default::default();
        let mut seen_fire: std::collections::HashSet<(i64, DateTime<Utc>)> = Default::default();
        let mut out = Vec::with_capacity(n);
        for t in &tasks {
            let entry = if let Some(k) = t.idempotency_key.as_deref() {
                match by_key.get(k) {
                    Some(&(id, status)) if seen_key.insert(k) => (id, status, false),
                    Some(&(id, status)) => (id, status, true),
                    None => match existing_key.get(k) {
                        Some(&(id, status)) => (id, status, true),
                        // The conflict was on the agent's cron tick, not on the key.
                        None => {
                            let (id, status): (TaskId, Status) = sqlx::query_as(
                                "SELECT id, status FROM tasks WHERE agent_id = $1 AND fire_at = $2",
                            )
                            .bind(t.agent_id)
                            .bind(t.fire_at)
                            .fetch_optional(&mut *conn)
                            .await?
                            .ok_or_else(|| Error::Invalid {
                                field: "idempotency_key",
                                reason: format!("{k:?} conflicted but its task vanished; retry"),
                            })?;
                            (id, status, true)
                        }
                    },
                }
            } else if let (Some(a), Some(f)) = (t.agent_id, t.fire_at) {
                match by_fire.get(&(a, f)) {
                    Some(&(id, status)) if seen_fire.insert((a, f)) => (id, status, false),
                    Some(&(id, status)) => (id, status, true),
                    None => {
                        let (id, status): (TaskId, Status) = sqlx::query_as(
                            "SELECT id, status FROM tasks WHERE agent_id = $1 AND fire_at = $2",
                        )
                        .bind(a)
                        .bind(f)
                        .fetch_one(&mut *conn)
                        .await?;
                        (id, status, true)
                    }
                }
            } else {
                let (id, status) = plain.next().expect("every plain entry was inserted");
                (id, status, false)
            };
            out.push(Enqueued {
                id: entry.0,
                status: entry.1,
                deduplicated: entry.2,
            });
        }
        Ok(out)
    }

    /// Claims up to `limit` runnable tasks of the given kinds for `replica`. Never more
    /// than asked for; a replica only claims kinds it has handlers for.
    pub async fn claim(
        &self,
        replica: &str,
        limit: u32,
        kinds: &[String],
    ) -> Result<Vec<Claimed>, Error> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        use tracing::Instrument;
        let span = tracing::info_span!("queue.claim", limit);
        async {
            let mut tx = self.pool.begin().await?;
            pin_plan(&mut tx, CLAIM_PLAN).await?;
            let mut rows: Vec<Claimed> = sqlx::query_as(CLAIM)
                .bind(replica)
                .bind(limit as i64)
                .bind(kinds)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            // RETURNING has no order: restore the claim's, so a batch starts highest first.
            rows.sort_by(|a, b| {
                b.priority
                    .cmp(&a.priority)
                    .then(a.scheduled_at.cmp(&b.scheduled_at))
                    .then(a.id.cmp(&b.id))
            });
            Ok(rows)
        }
        .instrument(span)
        .await
    }

    /// Writes a batch of finished attempts in one statement. Returns how many rows changed:
    /// fewer than given when some attempts were stale (rescued and rerun elsewhere).
    ///
    /// Output is stored whatever it holds: a NUL (which PostgreSQL cannot store) becomes
    /// [`crate::db::text::NUL_MARK`]. When the database refuses the batch for what is in it
    /// (a constraint, a trigger, a value too large), the rows are written one by one, so only
    /// the row it refuses fails: that task ends `failed`, not retried, with the reason. `Err`
    /// means the database could not be reached; the whole batch may be written again.
    pub async fn complete(&self, replica: &str, batch: &[Completion]) -> Result<u64, Error> {
        let mut deferred = 0;
        for c in batch {
            if let Outcome::Deferred(delay) = c.outcome {
                deferred += self.defer(replica, c.id, c.attempt, delay).await?;
            }
        }
        let rows: Vec<CompletionRow> = batch.iter().filter_map(CompletionRow::of).collect();
        if rows.is_empty() {
            return Ok(deferred);
        }
        match self.write_completions(replica, &rows).await {
            Ok(n) => return Ok(n + deferred),
            Err(e) if crate::db::is_transient(&e) => return Err(e.into()),
            Err(e) if rows.len() > 1 => {
                tracing::warn!(error = %e, tasks = rows.len(), "a completion batch was refused; writing its rows one by one");
            }
            Err(_) => {}
        }
        let mut applied = deferred;
        for row in &rows {
            match self
                .write_completions(replica, std::slice::from_ref(row))
                .await
            {
                Ok(n) => applied += n,
                Err(e) if crate::db::is_transient(&e) => return Err(e.into()),
                Err(e) => {
                    let reason = crate::db::text::replace_nul_str(&format!(
                        "the attempt ended ({}) but its outcome could not be stored: {e}",
                        row.final_status
                    ));
                    tracing::error!(task.id = row.id, error = %e, "the database refused a completion; the task ends failed");
                    let refused = CompletionRow::refused(row, &reason);
                    match self
                        .write_completions(replica, std::slice::from_ref(&refused))
                        .await
                    {
                        Ok(n) => applied += n,
                        Err(e) if crate::db::is_transient(&e) => return Err(e.into()),
                        // Nothing of the agent's is left in this row; if even it is refused,
                        // the database itself is broken (a trigger of someone's): say so, and
                        // leave the task to an operator rather than retry it for ever.
                        Err(e) => {
                            tracing::error!(task.id = row.id, error = %e, "the database refused even the failure record of this task; it stays running until an operator acts")
                        }
                    }
                }
            }
        }
        Ok(applied)
    }

    /// One statement (and the handoffs of the rows it applied), in one transaction.
    async fn write_completions(
        &self,
        replica: &str,
        rows: &[CompletionRow<'_>],
    ) -> Result<u64, sqlx::Error> {
        let n = rows.len();
        let mut id = Vec::with_capacity(n);
        let mut attempt = Vec::with_capacity(n);
        let mut ok = Vec::with_capacity(n);
        let mut retryable = Vec::with_capacity(n);
        let mut result: Vec<Option<&Value>> = Vec::with_capacity(n);
        let mut error: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut final_status = Vec::with_capacity(n);
        let mut retry_at = Vec::with_capacity(n);
        for r in rows {
            id.push(r.id);
            attempt.push(r.attempt);
            ok.push(r.ok);
            retryable.push(r.retryable);
            result.push(r.result.as_deref());
            error.push(r.error.as_deref());
            final_status.push(r.final_status.as_str());
            retry_at.push(r.retry_at);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query(COMPLETE_PLAN).execute(&mut *tx).await?;
        let done: Vec<TaskId> = sqlx::query_scalar(COMPLETE)
            .bind(&id)
            .bind(&attempt)
            .bind(&ok)
            .bind(&retryable)
            .bind(&result)
            .bind(&error)
            .bind(&final_status)
            .bind(&retry_at)
            .bind(replica)
            .fetch_all(&mut *tx)
            .await?;
        // Handoffs (agent runs only) for the completions that applied: the fence let them in.
        if rows.iter().any(|r| r.handoff.is_some()) {
            let applied: std::collections::HashSet<TaskId> = done.iter().copied().collect();
            let handoffs: Vec<crate::handoff::HandoffWrite> = rows
                .iter()
                .filter(|r| applied.contains(&r.id))
                .filter_map(|r| r.handoff.as_ref().map(|h| h.as_ref().clone()))
                .collect();
            crate::handoff::write_in(&mut tx, &handoffs).await?;
        }
        tx.commit().await?;
        Ok(done.len() as u64)
    }

    /// Puts attempts `replica` holds back to `pending` without counting them (graceful
    /// shutdown of work that had not finished, a claim too old to start). Each is given as
    /// (task, attempt) and fenced like a completion: a task rescued meanwhile is not touched.
    pub async fn release(&self, replica: &str, attempts: &[(TaskId, i32)]) -> Result<u64, Error> {
        let (ids, nums): (Vec<TaskId>, Vec<i32>) = attempts.iter().copied().unzip();
        let done = sqlx::query(
            "UPDATE tasks t SET \
                 status = CASE WHEN t.cancel_requested THEN 'cancelled' ELSE 'pending' END, \
                 completed_at = CASE WHEN t.cancel_requested THEN now() END, \
                 cancel_requested = false, locked_by = NULL, attempt = t.attempt - 1, \
                 started_at = NULL \
             FROM unnest($1::bigint[], $2::int[]) AS u(id, attempt) \
             WHERE t.id = u.id AND t.attempt = u.attempt AND t.locked_by = $3",
        )
        .bind(&ids)
        .bind(&nums)
        .bind(replica)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() > 0 {
            sqlx::query("SELECT pg_notify('harness_tasks', '')")
                .execute(&self.pool)
                .await?;
        }
        Ok(done.rows_affected())
    }

    /// Puts a running task back to `pending` for `delay`, its attempt not counted (an agent
    /// run that must wait for the previous one). Fenced like a completion.
    pub async fn defer(
        &self,
        replica: &str,
        id: TaskId,
        attempt: i32,
        delay: Duration,
    ) -> Result<u64, Error> {
        Ok(sqlx::query(
            "UPDATE tasks SET \
                 status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'pending' END, \
                 completed_at = CASE WHEN cancel_requested THEN now() END, \
                 cancel_requested = false, locked_by = NULL, attempt = attempt - 1, \
                 started_at = NULL, scheduled_at = now() + make_interval(secs => $4) \
             WHERE id = $1 AND attempt = $2 AND locked_by = $3",
        )
        .bind(id)
        .bind(attempt)
        .bind(replica)
        .bind(delay.as_secs_f64())
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Returns tasks held by replicas whose heartbeat is older than `rescue_after` to the
    /// queue (or fails them when no retries are left). Returns the rescued ids.
    pub async fn rescue(&self, rescue_after: Duration) -> Result<Vec<TaskId>, Error> {
        let ids: Vec<TaskId> = sqlx::query_scalar(RESCUE)
            .bind(rescue_after.as_secs_f64())
            .fetch_all(&self.pool)
            .await?;
        if !ids.is_empty() {
            sqlx::query("SELECT pg_notify('harness_tasks', '')")
                .execute(&self.pool)
                .await?;
        }
        Ok(ids)
    }

    /// Cancels a task: a pending or scheduled one at once; a running one is flagged and its
    /// owner told to abort it. Returns the status after the call.
    pub async fn cancel(&self, id: TaskId) -> Result<Status, Error> {
        let row: Option<(Status,)> = sqlx::query_as(
            "WITH c AS (
                UPDATE tasks SET
                    status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
                    cancel_requested = (status = 'running'),
                    completed_at = CASE WHEN status = 'running' THEN completed_at ELSE now() END,
                    locked_by = CASE WHEN status = 'running' THEN locked_by ELSE NULL END
                WHERE id = $1 AND status IN ('pending', 'retry_scheduled', 'running')
                RETURNING status
             )
             SELECT c.status FROM c, (SELECT pg_notify('harness_cancel', $1::text)) n",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some((s,)) => Ok(s),
            None => {
                let task = self.get(id).await?;
                Err(Error::WrongState {
                    id,
                    status: task.status,
                    action: "cancel",
                    allowed: "pending, retry_scheduled or running",
                })
            }
        }
    }

    /// What `replica` holds: its running attempts as (task, attempt, cancel requested).
    /// Matches tasks_status_idx (status = 'running', locked_by).
    pub async fn held_by(&self, replica: &str) -> Result<Vec<(TaskId, i32, bool)>, Error> {
        Ok(sqlx::query_as(
            "SELECT id, attempt, cancel_requested FROM tasks \
             WHERE status = 'running' AND locked_by = $1",
        )
        .bind(replica)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn get(&self, id: TaskId) -> Result<Task, Error> {
        sqlx::query_as(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(Error::NotFound(id))
    }

    pub async fn stats(&self) -> Result<Stats, Error> {
        let rows: Vec<(Status, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM tasks GROUP BY status")
                .fetch_all(&self.pool)
                .await?;
        let by_status: HashMap<Status, i64> = rows.into_iter().collect();
        let total = by_status.values().sum();
        let get = |s| by_status.get(&s).copied().unwrap_or(0);
        let finished = get(Status::Completed) + get(Status::Failed) + get(Status::Timeout);
        let success_rate = if finished == 0 {
            0.0
        } else {
            (get(Status::Completed) as f64 * 1000.0 / finished as f64).round() / 10.0
        };
        Ok(Stats {
            total,
            by_status,
            success_rate,
        })
    }

    /// Deletes completed and cancelled tasks older than `age`, `batch` rows per statement,
    /// by one replica at a time (others skip). Returns how many rows were deleted.
    pub async fn prune(&self, age: Duration, batch: u32) -> Result<u64, Error> {
        let mut total = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let leader: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('harness:prune'))")
                    .fetch_one(&mut *tx)
                    .await?;
            if !leader {
                return Ok(total);
            }
            let deleted = sqlx::query(
                "DELETE FROM tasks WHERE id IN (
                    SELECT id FROM tasks
                    WHERE status IN ('completed', 'cancelled')
                      AND completed_at < now() - make_interval(secs => $1)
                    LIMIT $2)",
            )
            .bind(age.as_secs_f64())
            .bind(batch as i64)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            total += deleted;
            if deleted < batch as u64 {
                return Ok(total);
            }
        }
    }
}

/// What woke a replica's listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wakeup {
    /// New or returned work may be claimable.
    Tasks,
    /// Someone asked to cancel this task.
    Cancel(TaskId),
    /// The listener reconnected: notifications may have been missed.
    Reconnected,
}

/// The dedicated `LISTEN` connection of one replica.
pub struct Listener {
    inner: sqlx::postgres::PgListener,
}

impl Listener {
    /// Registers interest in both channels before the caller's first claim, so a task
    /// enqueued in between is not missed.
    pub async fn connect(pool: &PgPool) -> Result<Listener, Error> {
        let mut inner = sqlx::postgres::PgListener::connect_with(pool).await?;
        inner.listen_all([TASKS_CHANNEL, CANCEL_CHANNEL]).await?;
        Ok(Listener { inner })
    }

    /// The next wake-up. Reconnects by itself after a lost connection (and says so).
    pub async fn next(&mut self) -> Result<Wakeup, Error> {
        match self.inner.try_recv().await? {
            None => Ok(Wakeup::Reconnected),
            Some(n) if n.channel() == CANCEL_CHANNEL => match n.payload().parse() {
                Ok(id) => Ok(Wakeup::Cancel(id)),
                Err(_) => Ok(Wakeup::Tasks),
            },
            Some(_) => Ok(Wakeup::Tasks),
        }
    }
}

/// Filters of a task listing; newest first.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub status: Option<Status>,
    pub kind: Option<String>,
    pub agent_id: Option<i64>,
    pub limit: i64,
    pub offset: i64,
}

impl Queue {
    /// Tasks matching `f`, newest first (by id, the primary key).
    pub async fn list(&self, f: &TaskFilter) -> Result<Vec<Task>, Error> {
        if f.kind.as_deref().is_some_and(crate::db::text::has_nul) {
            return Err(Error::Invalid {
                field: "kind",
                reason: "holds a NUL character, which no kind has".into(),
            });
        }
        let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE true"
        ));
        if let Some(s) = f.status {
            q.push(" AND status = ").push_bind(s.as_str());
        }
        if let Some(k) = &f.kind {
            q.push(" AND kind = ").push_bind(k.clone());
        }
        if let Some(a) = f.agent_id {
            // tasks_agent_id_idx: (agent_id, id DESC).
            q.push(" AND agent_id = ").push_bind(a);
        }
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(f.limit)
            .push(" OFFSET ")
            .push_bind(f.offset);
        Ok(q.build_query_as().fetch_all(&self.pool).await?)
    }

    /// Deletes a task for good; a running task is refused (cancel it first).
    pub async fn delete(&self, id: TaskId) -> Result<(), Error> {
        let deleted: Option<TaskId> = sqlx::query_scalar(
            "DELETE FROM tasks WHERE id = $1 AND status <> 'running' RETURNING id",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match deleted {
            Some(_) => Ok(()),
            None => {
                let t = self.get(id).await?;
                Err(Error::WrongState {
                    id,
                    status: t.status,
                    action: "delete",
                    allowed: "any status but running (cancel it first)",
                })
            }
        }
    }

    /// A new task with the same kind, payload, priority, retries, agent and timeout as a
    /// failed or timed-out one, claimable at once.
    pub async fn retry(&self, id: TaskId) -> Result<Task, Error> {
        let new_id: Option<TaskId> = sqlx::query_scalar(
            "WITH n AS (
                INSERT INTO tasks (kind, payload, priority, max_retries, agent_id, timeout_ms)
                SELECT kind, payload, priority, max_retries, agent_id, timeout_ms FROM tasks
                WHERE id = $1 AND status IN ('failed', 'timeout')
                RETURNING id)
             SELECT n.id FROM n, (SELECT pg_notify('harness_tasks', '')) w",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match new_id {
            Some(n) => self.get(n).await,
            None => {
                let t = self.get(id).await?;
                Err(Error::WrongState {
                    id,
                    status: t.status,
                    action: "retry",
                    allowed: "failed or timeout",
                })
            }
        }
    }
}

/// Tasks per status, completed ones left out (they are most of the table, and the partial
/// indexes cover the rest).
pub async fn depth(pool: &PgPool) -> Result<Vec<(Status, i64)>, Error> {
    Ok(sqlx::query_as(
        "SELECT status, count(*) FROM tasks WHERE status <> 'completed' GROUP BY status",
    )
    .fetch_all(pool)
    .await?)
}
