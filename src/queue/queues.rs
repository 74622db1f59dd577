//! Named queues: their backlog, and their fleet-wide pause (the `queues` table, read by every
//! claim). A queue exists as soon as a task names it; a row in `queues` only records a pause
//! or a resume.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::{Error, validate_queue_name};

/// The longest reason a pause keeps.
pub const MAX_REASON: usize = 1000;

/// A queue as `harness queues list` and the API show it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct QueueInfo {
    pub name: String,
    /// Due now: what the replicas serving it would claim next.
    pub runnable: i64,
    /// Waiting for their start time (a delay, or a retry's backoff).
    pub delayed: i64,
    pub running: i64,
    /// Paused fleet-wide: no replica claims from it until it is resumed.
    pub paused: bool,
    /// What was given with the pause.
    pub reason: String,
    /// When it was last paused or resumed (none: never).
    pub updated_at: Option<DateTime<Utc>>,
}

impl QueueInfo {
    /// A queue with no task and no pause on record.
    pub fn empty(name: &str) -> QueueInfo {
        QueueInfo {
            name: name.to_string(),
            runnable: 0,
            delayed: 0,
            running: 0,
            paused: false,
            reason: String::new(),
            updated_at: None,
        }
    }
}

/// Every queue that holds waiting or running tasks, or that was ever paused or resumed, by
/// name. Waiting tasks are counted in tasks_queue_claim_idx, running ones in tasks_status_idx.
pub async fn list(pool: &PgPool) -> Result<Vec<QueueInfo>, Error> {
    Ok(sqlx::query_as(
        "WITH waiting AS ( \
             SELECT queue, count(*) FILTER (WHERE scheduled_at <= now()) AS runnable, \
                    count(*) FILTER (WHERE scheduled_at > now()) AS delayed \
             FROM tasks WHERE status IN ('pending', 'retry_scheduled') GROUP BY queue), \
         running AS ( \
             SELECT queue, count(*) AS running FROM tasks WHERE status = 'running' \
             GROUP BY queue), \
         names AS ( \
             SELECT queue AS name FROM waiting UNION SELECT queue FROM running \
             UNION SELECT name FROM queues) \
         SELECT n.name, COALESCE(w.runnable, 0) AS runnable, COALESCE(w.delayed, 0) AS delayed, \
                COALESCE(r.running, 0) AS running, COALESCE(q.paused, false) AS paused, \
                COALESCE(q.reason, '') AS reason, q.updated_at \
         FROM names n \
         LEFT JOIN waiting w ON w.queue = n.name \
         LEFT JOIN running r ON r.queue = n.name \
         LEFT JOIN queues q ON q.name = n.name \
         ORDER BY n.name",
    )
    .fetch_all(pool)
    .await?)
}

/// Runnable tasks per queue (due now), for the `harness_queue_runnable` gauge: one count per
/// queue that has any, from tasks_queue_claim_idx.
pub async fn runnable(pool: &PgPool) -> Result<Vec<(String, i64)>, Error> {
    Ok(sqlx::query_as(
        "SELECT queue, count(*) FROM tasks \
         WHERE status IN ('pending', 'retry_scheduled') AND scheduled_at <= now() \
         GROUP BY queue",
    )
    .fetch_all(pool)
    .await?)
}

/// Pauses `name` fleet-wide: from this commit on, no claim takes a task of it (tasks already
/// claimed run to their end). Returns whether it was running before.
pub async fn pause(pool: &PgPool, name: &str, reason: &str) -> Result<bool, Error> {
    check(name)?;
    if crate::db::text::has_nul(reason) || reason.chars().count() > MAX_REASON {
        return Err(Error::Invalid {
            field: "reason",
            reason: format!("must be at most {MAX_REASON} characters, without NUL"),
        });
    }
    let mut tx = pool.begin().await?;
    let was_paused = paused_before(&mut tx, name).await?;
    sqlx::query(
        "INSERT INTO queues (name, paused, reason, updated_at) VALUES ($1, true, $2, now()) \
         ON CONFLICT (name) DO UPDATE SET paused = true, reason = $2, updated_at = now()",
    )
    .bind(name)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(!was_paused.unwrap_or(false))
}

/// Resumes `name` and wakes every replica, which claim from it at once. Returns whether it
/// was paused before.
pub async fn resume(pool: &PgPool, name: &str) -> Result<bool, Error> {
    check(name)?;
    let mut tx = pool.begin().await?;
    let was_paused = paused_before(&mut tx, name).await?;
    sqlx::query(
        "INSERT INTO queues (name, paused, reason, updated_at) VALUES ($1, false, '', now()) \
         ON CONFLICT (name) DO UPDATE SET paused = false, reason = '', updated_at = now()",
    )
    .bind(name)
    .execute(&mut *tx)
    .await?;
    // Sent at commit: every replica serving the queue claims from it at once.
    sqlx::query(super::NOTIFY_TASKS).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(was_paused.unwrap_or(false))
}

/// Whether `name` is paused, its row (if any) locked until the transaction ends, so that two
/// concurrent pauses or resumes each report what they changed.
async fn paused_before(tx: &mut sqlx::PgConnection, name: &str) -> Result<Option<bool>, Error> {
    Ok(
        sqlx::query_scalar("SELECT paused FROM queues WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(tx)
            .await?,
    )
}

fn check(name: &str) -> Result<(), Error> {
    validate_queue_name(name).map_err(|reason| Error::Invalid {
        field: "queue",
        reason,
    })
}
