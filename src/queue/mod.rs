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
//! One file per part: `task` (the types), `enqueue`, `attempt` (claim and complete),
//! `lifecycle` (release, defer, rescue, cancel, prune), `admin` (reads and administration),
//! `logs` (the output of runs, in `task_logs`), `listener` (LISTEN), `backoff` (retry
//! delays, pure).
//!
//! The queue never runs user code; the `worker` does, and reports back through
//! [`Queue::complete`].

use serde::{Deserialize, Serialize};

// The channel names, spelled once: the constants and the SQL below are built from them.
macro_rules! tasks_channel {
    () => {
        "harness_tasks"
    };
}
macro_rules! cancel_channel {
    () => {
        "harness_cancel"
    };
}
/// The advisory lock (two-int4 form: apart from the scheduler's bigint key) that claims hold
/// shared and a change of the limits holds exclusive.
macro_rules! limits_lock {
    () => {
        "727274, 20"
    };
}
/// A subquery that wakes idle replicas: one NOTIFY per statement, however many rows changed.
macro_rules! notify_tasks {
    () => {
        concat!("(SELECT pg_notify('", tasks_channel!(), "', ''))")
    };
}
/// A task's return to `pending` without counting its attempt (or to `cancelled` when a cancel
/// was asked meanwhile): the SET list shared by release and defer, for `UPDATE tasks t`.
macro_rules! back_to_queue {
    () => {
        "status = CASE WHEN t.cancel_requested THEN 'cancelled' ELSE 'pending' END,
         completed_at = CASE WHEN t.cancel_requested THEN now() END,
         cancel_requested = false, locked_by = NULL, attempt = t.attempt - 1,
         started_at = NULL"
    };
}

mod admin;
mod attempt;
pub mod backoff;
mod coalesce;
mod enqueue;
mod lifecycle;
pub mod limits;
mod listener;
pub mod logs;
pub mod queues;
mod task;

pub use admin::{
    RARE_KIND, RunStats, SEED_BATCH, STATS_PUBLISH_DELAY, SYNTHETIC_KINDS, SeededHistory,
    SyntheticHistory, TableReads, Waiting, capped_counts, depth, estimated_total, seed_history,
    table_reads, waiting,
};
pub use attempt::{Completion, Outcome, Round};
pub use listener::{Listener, Wakeup};
use task::TASK_COLUMNS;
pub use task::{
    AttemptRecord, AttemptStatus, Claimed, Enqueued, NewTask, Stats, Task, TaskFilter,
    validate_queue_name,
};

use sqlx::PgPool;

/// The channel replicas `LISTEN` on for new work.
pub const TASKS_CHANNEL: &str = tasks_channel!();

/// The channel that tells a task's owner to abort it.
pub const CANCEL_CHANNEL: &str = cancel_channel!();
/// A statement that wakes idle replicas.
const NOTIFY_TASKS: &str = concat!("SELECT ", notify_tasks!());

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

pub use crate::bounds::MAX_RETRIES;

/// The queue of a task or agent that names none.
pub const DEFAULT_QUEUE: &str = "default";

/// Longest queue name accepted.
pub const MAX_QUEUE_LEN: usize = 64;

/// Longest kind name accepted.
pub const MAX_KIND_LEN: usize = 128;

/// Largest payload accepted, serialised: the queue carries work descriptions, not data.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

/// Handle on the task queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Queue {
    pool: PgPool,
    default_max_retries: u32,
    /// The writers that group concurrent single enqueues into one commit.
    coalescer: coalesce::Coalescer,
    /// The limits as this handle (and its clones) last read them.
    limits: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<limits::LimitSet>>>>,
    /// Until when the limited claim is skipped: the last one found nothing limits apply to.
    limited_idle_until: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl Queue {
    pub fn new(pool: PgPool, default_max_retries: u32) -> Queue {
        Queue {
            pool,
            default_max_retries,
            coalescer: Default::default(),
            limits: Default::default(),
            limited_idle_until: Default::default(),
        }
    }

    /// This queue without its writers (theirs: holding it would keep them alive forever).
    fn direct(&self) -> Queue {
        Queue::new(self.pool.clone(), self.default_max_retries)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}
