//! An attempt's way through the table: claimed (one statement for as many rows as there are
//! free slots, `SKIP LOCKED`), then completed in batches fenced by owner and attempt, each
//! batch written row by row when the database refuses it.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use std::time::Duration;

use super::{Claimed, Error, Queue, Status, TaskId};

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success(Value),
    /// The handler returned an error (or panicked); retried while retries remain.
    Failed(String),
    /// The handler said no retry can succeed: `failed` at once.
    FailedPermanently(String),
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
pub(super) struct CompletionRow<'a> {
    pub(super) id: TaskId,
    pub(super) attempt: i32,
    pub(super) ok: bool,
    pub(super) retryable: bool,
    pub(super) result: Option<std::borrow::Cow<'a, Value>>,
    pub(super) error: Option<std::borrow::Cow<'a, str>>,
    pub(super) final_status: Status,
    pub(super) retry_at: DateTime<Utc>,
    pub(super) handoff: Option<std::borrow::Cow<'a, crate::handoff::HandoffWrite>>,
}

impl<'a> CompletionRow<'a> {
    /// `None` for a deferred attempt, which is not a completion.
    pub(super) fn of(c: &'a Completion) -> Option<CompletionRow<'a>> {
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
            Outcome::FailedPermanently(e) => {
                (false, false, None, Some(storable_text(e)), Status::Failed)
            }
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
    pub(super) fn refused(row: &CompletionRow<'_>, reason: &str) -> CompletionRow<'static> {
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

// The claim. The inner SELECT walks tasks_claim_idx (partial on the claimable statuses,
// ordered like this); `id = ANY(ARRAY(...))` makes the UPDATE look rows up by primary key
// (a join here gets planned as a hash join over a sequential scan of the whole table).
pub(super) const CLAIM: &str = "
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
pub(super) const COMPLETE: &str = "
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
pub(super) const CLAIM_PLAN: &str =
    "SELECT set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true)";

// COMPLETE's generic plan sees `unnest` as a few rows and probes the primary key once per
// input row, whatever the batch size. A custom plan made with the real array size and stale
// statistics for `locked_by` can pick a sequential scan in a nested loop: 700 ms for a
// 1024-row batch (measured).
pub(super) const COMPLETE_PLAN: &str =
    "SELECT set_config('plan_cache_mode', 'force_generic_plan', true)";

pub(super) async fn pin_plan(conn: &mut PgConnection, settings: &'static str) -> Result<(), Error> {
    sqlx::query(settings).execute(conn).await?;
    Ok(())
}

impl Queue {
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
    pub(super) async fn write_completions(
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
}
