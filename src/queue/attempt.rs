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

// The claim, for each queue of `$3` (with its limit in `$4`) that is not paused: the lateral
// SELECT walks tasks_queue_claim_idx from (queue, highest priority) on, so no row of a queue
// the replica does not serve is read; `id = ANY(ARRAY(...))` makes the UPDATE look rows up by
// primary key (a join here gets planned as a hash join over a sequential scan of the table).
// A pause commits before the claims that must honour it begin: each reads `queues` afresh.
// It claims nothing unless the limits are those the replica read (`$5`, their version): with
// a limit added meanwhile it might take tasks the limit holds back.
macro_rules! claim_sql {
    ($unlimited:expr, $version:expr) => {
        concat!(
            "
UPDATE tasks t
SET status = 'running', locked_by = $1, attempt = t.attempt + 1, started_at = now()
WHERE t.id = ANY(ARRAY(
    SELECT c.id
    FROM unnest($3::text[], $4::bigint[]) AS q(name, n)
    CROSS JOIN LATERAL (
        SELECT id FROM tasks
        WHERE queue = q.name AND status IN ('pending', 'retry_scheduled')
          AND scheduled_at <= now() AND kind = ANY($2)",
            $unlimited,
            "
        ORDER BY priority DESC, scheduled_at, id
        LIMIT q.n
        FOR UPDATE SKIP LOCKED) c
    WHERE NOT EXISTS (SELECT 1 FROM queues p WHERE p.name = q.name AND p.paused)
      AND (SELECT version FROM limits_version) = ",
            $version,
            "))
RETURNING t.id, t.kind, t.queue, t.payload, t.priority, t.attempt, t.retry_count,
          t.max_retries, t.timeout_ms, t.agent_id, t.traceparent, t.scheduled_at, t.started_at"
        )
    };
}

/// The claim with no limit in force.
pub(super) const CLAIM: &str = claim_sql!("", "$5");

/// The claim of the tasks no limit applies to (the limited ones go through
/// [`super::limits`]): not the queues of `$6`, kinds of `$7`, agents of `$8`, keyed tasks
/// when `$9`, keys of `$10`.
pub(super) const CLAIM_UNLIMITED: &str = claim_sql!(
    "
          AND NOT (queue = ANY($6) OR kind = ANY($7) OR COALESCE(agent_id = ANY($8), false)
                   OR (concurrency_key IS NOT NULL AND ($9 OR concurrency_key = ANY($10))))",
    "$5"
);

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
// CLAIM walks tasks_queue_claim_idx in order and stops after LIMIT rows. Without statistics the
// planner expects a handful of rows and prefers a bitmap scan that fetches and sorts the
// whole backlog: 10 ms per claim for 20k waiting tasks, growing with the backlog (measured).
//
// Every claim also holds the limits lock shared until it commits (see `limits::LOCK`): a
// change of the limits waits for the claims in flight, so none made for the old limits
// commits after the new ones bind.
pub(super) const CLAIM_PLAN: &str = concat!(
    "SELECT set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true), \
     pg_advisory_xact_lock_shared(",
    limits_lock!(),
    ")"
);

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

/// What one claim round took, and when limits would let it take more.
#[derive(Debug, Default)]
pub struct Round {
    pub rows: Vec<Claimed>,
    /// Limits held tasks back this round.
    pub held_back: bool,
    /// When the next token returns to a rate limit that held tasks back.
    pub next_token_in: Option<std::time::Duration>,
    /// Queues whose limited tasks filled every free slot: more may be claimed as soon as an
    /// attempt of theirs ends.
    pub slot_bound: Vec<String>,
}

impl Queue {
    /// Claims up to `limit` runnable tasks of the given kinds from the default queue for
    /// `replica`: [`Queue::claim_from`] with that queue alone.
    pub async fn claim(
        &self,
        replica: &str,
        limit: u32,
        kinds: &[String],
    ) -> Result<Vec<Claimed>, Error> {
        self.claim_from(replica, &[(super::DEFAULT_QUEUE, limit)], kinds)
            .await
    }

    /// Claims up to `limit` runnable tasks of the given kinds from each `(queue, limit)` for
    /// `replica`, none from a paused queue, none that a limit holds back. Never more than
    /// asked for; a replica only claims kinds it has handlers for. Rows come highest
    /// priority first. See [`Queue::claim_round`].
    pub async fn claim_from(
        &self,
        replica: &str,
        limits: &[(&str, u32)],
        kinds: &[String],
    ) -> Result<Vec<Claimed>, Error> {
        let asked: Vec<(&str, u32, u32)> = limits.iter().map(|(q, n)| (*q, *n, *n)).collect();
        Ok(self.claim_round(replica, &asked, kinds).await?.rows)
    }

    /// [`Queue::claim_from`] for `(queue, rows, free slots)`, saying also how soon to ask
    /// again when limits held tasks back. Without limits in force it is one statement. With
    /// some, the tasks they may apply to are claimed first in a transaction of their own (see
    /// [`super::limits`]), at most a queue's free slots of them (none into a prefetch buffer,
    /// where they would hold a slot or a token without running), then the rest in one
    /// statement.
    pub async fn claim_round(
        &self,
        replica: &str,
        limits: &[(&str, u32, u32)],
        kinds: &[String],
    ) -> Result<Round, Error> {
        let free: Vec<(&str, u32)> = limits.iter().map(|(q, n, f)| (*q, (*f).min(*n))).collect();
        let mut asked: Vec<(&str, u32)> = limits
            .iter()
            .filter(|(_, n, _)| *n > 0)
            .map(|(q, n, _)| (*q, *n))
            .collect();
        let mut round = Round::default();
        if asked.is_empty() {
            return Ok(round);
        }
        use tracing::Instrument;
        let limit: u32 = asked.iter().map(|(_, n)| n).sum();
        let span = tracing::info_span!("queue.claim", limit);
        async {
            // Twice at most: a claim made for limits that changed meanwhile takes nothing, and
            // is made again with the limits read anew.
            // A step that fails after rows were claimed (and committed) must not lose them: the
            // round ends with what it has, and the replica runs them.
            macro_rules! or_keep {
                ($e:expr) => {
                    match $e {
                        Ok(v) => v,
                        Err(e) if round.rows.is_empty() => return Err(e),
                        Err(e) => {
                            tracing::warn!(error = %e, claimed = round.rows.len(), "a claim round failed after claiming; running what it claimed");
                            break;
                        }
                    }
                };
            }
            for _ in 0..2 {
                let set = or_keep!(self.limit_set(false).await);
                // A limited claim that found nothing to take is not made again for a while:
                // limits that apply to none of these tasks cost the plain claims nothing.
                let idle = self
                    .limited_idle_until
                    .lock()
                    .expect("limits lock")
                    .and_then(|t| t.checked_duration_since(std::time::Instant::now()));
                if !set.is_empty()
                    && let Some(left) = idle
                {
                    // Tasks a limit applies to may have come since: ask again when the pause
                    // ends, not at the poll interval.
                    round.held_back = true;
                    round.next_token_in = Some(left);
                }
                if !set.is_empty() && idle.is_none() {
                    // What is still asked of each queue, up to its free slots.
                    let want: Vec<(&str, u32)> = asked
                        .iter()
                        .map(|(q, n)| {
                            let f = free.iter().find(|(fq, _)| fq == q).map_or(0, |(_, f)| *f);
                            (*q, (*n).min(f))
                        })
                        .collect();
                    let limited =
                        or_keep!(super::limits::claim_limited(&self.pool, replica, &want, kinds).await);
                    for (q, w) in &want {
                        let took = limited.rows.iter().filter(|r| r.queue == *q).count() as u32;
                        let room = asked.iter().find(|(a, _)| a == q).map_or(0, |(_, n)| *n);
                        if *w > 0 && took == *w && *w < room {
                            round.slot_bound.push(q.to_string());
                        }
                    }
                    for row in &limited.rows {
                        if let Some(a) = asked.iter_mut().find(|(q, _)| *q == row.queue) {
                            a.1 -= 1;
                        }
                    }
                    if limited.held_back {
                        round.held_back = true;
                        round.next_token_in = limited.next_token_in;
                    }
                    *self.limited_idle_until.lock().expect("limits lock") =
                        (limited.rows.is_empty() && !limited.held_back)
                            .then(|| std::time::Instant::now() + super::limits::IDLE_RECHECK);
                    round.rows.extend(limited.rows);
                    if limited.version != set.version {
                        // Limits changed since they were cached: the plain claim would leave
                        // out the wrong tasks. Read them again and go on with those.
                        or_keep!(self.limit_set(true).await);
                        continue;
                    }
                }
                // Every task of a limited queue is the limited claim's.
                let unlimited: Vec<(&str, u32)> = asked
                    .iter()
                    .filter(|(q, _)| {
                        !set.limits
                            .iter()
                            .any(|l| l.scope == super::limits::Scope::Queue && l.target == *q)
                    })
                    .copied()
                    .collect();
                let wanted: u32 = unlimited.iter().map(|(_, n)| n).sum();
                if wanted == 0 {
                    break;
                }
                let (rows, version) = or_keep!(
                    self.claim_unlimited(replica, &unlimited, kinds, &set)
                        .await
                );
                let got = rows.len() as u32;
                for row in &rows {
                    if let Some(a) = asked.iter_mut().find(|(q, _)| *q == row.queue) {
                        a.1 -= 1;
                    }
                }
                round.rows.extend(rows);
                // A claim that took rows was made for the limits in force (its statement checks
                // the version); one that took none says which version was.
                if got == wanted || version.is_none_or(|v| v == set.version) {
                    break;
                }
                or_keep!(self.limit_set(true).await);
            }
            // RETURNING has no order: restore the claim's, so a batch starts highest first.
            round.rows.sort_by(|a, b| {
                b.priority
                    .cmp(&a.priority)
                    .then(a.scheduled_at.cmp(&b.scheduled_at))
                    .then(a.id.cmp(&b.id))
            });
            Ok(round)
        }
        .instrument(span)
        .await
    }

    /// One claim statement for the tasks no limit of `set` applies to; with the rows, when it
    /// took none, the limits' version in force (a claim made for other limits takes nothing).
    async fn claim_unlimited(
        &self,
        replica: &str,
        asked: &[(&str, u32)],
        kinds: &[String],
        set: &super::limits::LimitSet,
    ) -> Result<(Vec<Claimed>, Option<i64>), Error> {
        let (queues, ns): (Vec<&str>, Vec<i64>) = asked
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(q, n)| (*q, *n as i64))
            .unzip();
        let mut tx = self.pool.begin().await?;
        pin_plan(&mut tx, CLAIM_PLAN).await?;
        let rows: Vec<Claimed> = if set.is_empty() {
            sqlx::query_as(CLAIM)
                .bind(replica)
                .bind(kinds)
                .bind(&queues)
                .bind(&ns)
                .bind(set.version)
                .fetch_all(&mut *tx)
                .await?
        } else {
            let ex = set.exclusions();
            sqlx::query_as(CLAIM_UNLIMITED)
                .bind(replica)
                .bind(kinds)
                .bind(&queues)
                .bind(&ns)
                .bind(set.version)
                .bind(&ex.queues)
                .bind(&ex.kinds)
                .bind(&ex.agents)
                .bind(ex.every_key)
                .bind(&ex.keys)
                .fetch_all(&mut *tx)
                .await?
        };
        // Read under the same shared limits lock: it cannot have changed since the claim.
        let version = if rows.is_empty() {
            Some(
                sqlx::query_scalar("SELECT version FROM limits_version")
                    .fetch_one(&mut *tx)
                    .await?,
            )
        } else {
            None
        };
        tx.commit().await?;
        Ok((rows, version))
    }

    /// Whether a limit of the queue itself was in force when this handle last read the
    /// limits: every task of it is claimed by the limited claim, into free slots only.
    pub fn queue_limited(&self, queue: &str) -> bool {
        self.limits
            .lock()
            .expect("limits lock")
            .as_ref()
            .is_some_and(|set| {
                set.limits
                    .iter()
                    .any(|l| l.scope == super::limits::Scope::Queue && l.target == queue)
            })
    }

    /// The limits this handle last read; read anew when `fresh` or never read. A reread
    /// that finds the version unchanged keeps the cached set.
    pub(super) async fn limit_set(
        &self,
        fresh: bool,
    ) -> Result<std::sync::Arc<super::limits::LimitSet>, Error> {
        if !fresh && let Some(set) = self.limits.lock().expect("limits lock").clone() {
            return Ok(set);
        }
        let mut conn = self.pool.acquire().await?;
        let set = std::sync::Arc::new(super::limits::LimitSet::load(&mut conn).await?);
        *self.limits.lock().expect("limits lock") = Some(set.clone());
        Ok(set)
    }

    /// The plan of [`Queue::claim_from`] as it runs (EXPLAIN ANALYZE, text), in a transaction
    /// rolled back: nothing is claimed. For tests and `harness doctor`-style checks of which
    /// index serves the claim and how many rows it reads.
    pub async fn claim_plan(
        &self,
        limits: &[(&str, u32)],
        kinds: &[String],
    ) -> Result<String, Error> {
        let (queues, ns): (Vec<&str>, Vec<i64>) =
            limits.iter().map(|(q, n)| (*q, *n as i64)).unzip();
        let version = self.limit_set(true).await?.version;
        let mut tx = self.pool.begin().await?;
        pin_plan(&mut tx, CLAIM_PLAN).await?;
        let lines: Vec<String> = sqlx::query_scalar(&format!(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {CLAIM}"
        ))
        .bind("explain")
        .bind(kinds)
        .bind(&queues)
        .bind(&ns)
        .bind(version)
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        Ok(lines.join("\n"))
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
