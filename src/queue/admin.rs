//! Reading and administering tasks: one, a listing, counts, delete, retry, depth, and the
//! measurements `harness bench` and agent overlap rules need, with the synthetic history
//! `harness bench --console` renders pages over and the table-read counters it reports.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::collections::HashMap;

use super::{Error, Queue, Stats, Status, TASK_COLUMNS, Task, TaskFilter, TaskId};

/// Tasks per status, completed ones left out (they are most of the table, and the partial
/// indexes cover the rest).
pub async fn depth(pool: &PgPool) -> Result<Vec<(Status, i64)>, Error> {
    // Two halves, each with its partial index's predicate spelled so the planner can prove it:
    // waiting work in tasks_claim_idx, the rest in tasks_status_idx. One `status <> 'completed'`
    // matches neither index and scans the whole table.
    Ok(sqlx::query_as(
        "SELECT status, count(*) FROM tasks WHERE status IN ('pending', 'retry_scheduled') \
         GROUP BY status \
         UNION ALL \
         SELECT status, count(*) FROM tasks \
         WHERE status IN ('running', 'failed', 'timeout', 'cancelled') GROUP BY status",
    )
    .fetch_all(pool)
    .await?)
}

/// Tasks of each status but `completed`, counted up to `cap` each (the count says `cap` when
/// there are at least that many): bounded work per status, in the partial indexes
/// (tasks_claim_idx for waiting work, tasks_status_idx for the rest).
pub async fn capped_counts(pool: &PgPool, cap: i64) -> Result<Vec<(Status, i64)>, Error> {
    // Each status is a literal, so that the planner can prove the partial index's predicate.
    const STATUSES: [Status; 6] = [
        Status::Pending,
        Status::RetryScheduled,
        Status::Running,
        Status::Failed,
        Status::Timeout,
        Status::Cancelled,
    ];
    let parts: Vec<String> = STATUSES
        .iter()
        .map(|s| {
            format!(
                "(SELECT count(*) FROM (SELECT 1 FROM tasks WHERE status = '{}' LIMIT $1) x)",
                s.as_str()
            )
        })
        .collect();
    let row: (i64, i64, i64, i64, i64, i64) =
        sqlx::query_as(&format!("SELECT {}", parts.join(", ")))
            .bind(cap)
            .fetch_one(pool)
            .await?;
    let n = [row.0, row.1, row.2, row.3, row.4, row.5];
    Ok(STATUSES.into_iter().zip(n).collect())
}

/// The planner's estimate of the rows in `tasks` (from the last ANALYZE or autovacuum; -1 or
/// 0 before any), never a count.
pub async fn estimated_total(pool: &PgPool) -> Result<i64, Error> {
    Ok(sqlx::query_scalar(
        "SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE oid = 'tasks'::regclass",
    )
    .fetch_one(pool)
    .await?)
}

/// An agent's recent runs, summed: of its last `n` runs, how many completed, failed (or timed
/// out), failed in the last hour, and its newest ended run's status, end and duration (none
/// when it never started), all of that one run.
#[derive(Debug, Clone, PartialEq, Default, sqlx::FromRow)]
pub struct RunStats {
    pub agent_id: i64,
    pub finished: i64,
    pub completed: i64,
    pub failed: i64,
    pub failed_last_hour: i64,
    pub last_status: Option<Status>,
    pub last_ended_at: Option<DateTime<Utc>>,
    pub last_duration_s: Option<f64>,
}

impl RunStats {
    /// Completed runs among the finished ones (cancelled runs are not finished here), as a
    /// fraction; `None` without finished runs.
    pub fn success_rate(&self) -> Option<f64> {
        (self.finished > 0).then(|| self.completed as f64 / self.finished as f64)
    }
}

/// Waiting work (pending or retry_scheduled) split by whether it is due: how many are due,
/// how many are delayed (scheduled later), and how long the oldest due task has been due,
/// in seconds (0 when none is). tasks_claim_idx (its predicate is exactly "waiting").
pub async fn waiting(pool: &PgPool) -> Result<Waiting, Error> {
    let (due, delayed, oldest_due_s): (i64, i64, f64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE scheduled_at <= now()), \
                count(*) FILTER (WHERE scheduled_at > now()), \
                COALESCE(EXTRACT(EPOCH FROM now() - min(scheduled_at) \
                         FILTER (WHERE scheduled_at <= now())), 0)::float8 \
         FROM tasks WHERE status IN ('pending', 'retry_scheduled')",
    )
    .fetch_one(pool)
    .await?;
    Ok(Waiting {
        due,
        delayed,
        oldest_due_s,
    })
}

/// See [`waiting`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Waiting {
    pub due: i64,
    pub delayed: i64,
    pub oldest_due_s: f64,
}

impl Queue {
    pub async fn get(&self, id: TaskId) -> Result<Task, Error> {
        sqlx::query_as(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(Error::NotFound(id))
    }

    /// A task's status alone (a follower's frequent look; the primary key).
    pub async fn status(&self, id: TaskId) -> Result<Status, Error> {
        sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
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
        if let Some(b) = f.before {
            q.push(" AND id < ").push_bind(b);
        }
        if let Some(a) = f.after {
            q.push(" AND id > ").push_bind(a);
        }
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(f.limit)
            .push(" OFFSET ")
            .push_bind(f.offset);
        Ok(q.build_query_as().fetch_all(&self.pool).await?)
    }

    /// The newest run of each of `agent_ids` (of kind `kind`): its status and when it ended
    /// (or started, while running). One index walk per agent (tasks_agent_id_idx).
    pub async fn last_runs(
        &self,
        kind: &str,
        agent_ids: &[i64],
    ) -> Result<HashMap<i64, (Status, Option<DateTime<Utc>>)>, Error> {
        let rows: Vec<(i64, Status, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT a.id, t.status, COALESCE(t.completed_at, t.started_at) \
             FROM unnest($1::bigint[]) a(id) \
             CROSS JOIN LATERAL (SELECT status, completed_at, started_at FROM tasks \
                 WHERE agent_id = a.id AND kind = $2 ORDER BY id DESC LIMIT 1) t",
        )
        .bind(agent_ids)
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id, s, at)| (id, (s, at))).collect())
    }

    /// Deletes a task for good, with its output; a running task is refused (cancel it first).
    pub async fn delete(&self, id: TaskId) -> Result<(), Error> {
        let deleted: Option<TaskId> = sqlx::query_scalar(
            "WITH d AS (DELETE FROM tasks WHERE id = $1 AND status <> 'running' RETURNING id), \
                  l AS (DELETE FROM task_logs WHERE task_id IN (SELECT id FROM d)) \
             SELECT id FROM d",
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

    /// A new task with the same kind, payload, priority, retries, agent, timeout, queue and
    /// concurrency key as a failed or timed-out one, claimable at once.
    pub async fn retry(&self, id: TaskId) -> Result<Task, Error> {
        let new_id: Option<TaskId> = sqlx::query_scalar(concat!(
            "WITH n AS (
                INSERT INTO tasks (kind, payload, priority, max_retries, agent_id, timeout_ms,
                                   queue, concurrency_key)
                SELECT kind, payload, priority, max_retries, agent_id, timeout_ms, queue,
                       concurrency_key FROM tasks
                WHERE id = $1 AND status IN ('failed', 'timeout')
                RETURNING id)
             SELECT n.id FROM n, ",
            notify_tasks!(),
            " w"
        ))
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

impl Queue {
    /// Whether a run of `agent_id` (tasks of `kind`) claimed before task `id` is still
    /// running: what an agent's `overlap: skip` yields to. tasks_status_idx.
    pub async fn earlier_run_running(
        &self,
        kind: &str,
        agent_id: i64,
        id: TaskId,
    ) -> Result<bool, Error> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM tasks o JOIN tasks me ON me.id = $2 \
             WHERE o.status = 'running' AND o.agent_id = $1 AND o.kind = $3 \
               AND o.id <> $2 AND (o.started_at, o.id) < (me.started_at, me.id))",
        )
        .bind(agent_id)
        .bind(id)
        .bind(kind)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Whether an earlier run of `agent_id` (tasks of `kind`, enqueued before task `id`) is
    /// running or due: what `overlap: queue` waits for, first in first out, whatever order
    /// the claims happened in (a retry waiting out its backoff does not block).
    /// tasks_agent_id_idx.
    pub async fn earlier_run_waiting(
        &self,
        kind: &str,
        agent_id: i64,
        id: TaskId,
    ) -> Result<bool, Error> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM tasks WHERE agent_id = $1 AND kind = $3 \
             AND id < $2 AND (status = 'running' \
               OR (status IN ('pending', 'retry_scheduled') AND scheduled_at <= now())))",
        )
        .bind(agent_id)
        .bind(id)
        .bind(kind)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Whether any task after task `after` has not completed. Probes of the partial
    /// tasks_claim_idx and tasks_status_idx, where counting completed rows would scan: cheap
    /// enough to poll while measuring the system it would otherwise load.
    pub async fn any_unfinished(&self, after: TaskId) -> Result<bool, Error> {
        // Two probes, each of a partial index (tasks_claim_idx, tasks_status_idx): completed
        // rows, however many, are in neither.
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM tasks \
                            WHERE status IN ('pending', 'retry_scheduled') AND id > $1) \
                 OR EXISTS (SELECT 1 FROM tasks \
                            WHERE status NOT IN ('pending', 'completed') AND id > $1)",
        )
        .bind(after)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Seconds from the first start to the last completion, over the tasks after task
    /// `after` (`harness bench`), as the database clock saw them.
    pub async fn processing_window(&self, after: TaskId) -> Result<f64, Error> {
        Ok(sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM max(completed_at) - min(started_at))::float8 FROM tasks \
             WHERE id > $1",
        )
        .bind(after)
        .fetch_one(&self.pool)
        .await?)
    }

    /// The newest task's id (0 when there is none).
    pub async fn last_id(&self) -> Result<TaskId, Error> {
        Ok(sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM tasks")
            .fetch_one(&self.pool)
            .await?)
    }

    /// [`RunStats`] of each of `agent_ids` over its last `n` runs of kind `kind`: one walk of
    /// tasks_agent_id_idx per agent, at most `n` rows each.
    pub async fn run_stats(
        &self,
        kind: &str,
        agent_ids: &[i64],
        n: i64,
    ) -> Result<HashMap<i64, RunStats>, Error> {
        let rows: Vec<RunStats> = sqlx::query_as(
            "SELECT a.id AS agent_id, \
                count(*) FILTER (WHERE t.status IN ('completed', 'failed', 'timeout')) AS finished, \
                count(*) FILTER (WHERE t.status = 'completed') AS completed, \
                count(*) FILTER (WHERE t.status IN ('failed', 'timeout')) AS failed, \
                count(*) FILTER (WHERE t.status IN ('failed', 'timeout') \
                                   AND t.completed_at > now() - interval '1 hour') AS failed_last_hour, \
                (array_agg(t.status ORDER BY t.id DESC) FILTER (WHERE t.completed_at IS NOT NULL))[1] \
                    AS last_status, \
                (array_agg(t.completed_at ORDER BY t.id DESC) \
                    FILTER (WHERE t.completed_at IS NOT NULL))[1] AS last_ended_at, \
                (array_agg(EXTRACT(EPOCH FROM t.completed_at - t.started_at)::float8 ORDER BY t.id DESC) \
                    FILTER (WHERE t.completed_at IS NOT NULL))[1] AS last_duration_s \
             FROM unnest($1::bigint[]) a(id) \
             CROSS JOIN LATERAL (SELECT id, status, started_at, completed_at FROM tasks \
                 WHERE agent_id = a.id AND kind = $2 ORDER BY id DESC LIMIT $3) t \
             GROUP BY a.id",
        )
        .bind(agent_ids)
        .bind(kind)
        .bind(n)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.agent_id, r)).collect())
    }

    /// The task with this idempotency key (tasks_idempotency_key_idx).
    pub async fn find_by_key(&self, key: &str) -> Result<Option<TaskId>, Error> {
        if crate::db::text::has_nul(key) {
            return Ok(None);
        }
        Ok(
            sqlx::query_scalar("SELECT id FROM tasks WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// The smallest and largest task id (the two ends of the primary key), if any task.
    pub async fn id_range(&self) -> Result<Option<(TaskId, TaskId)>, Error> {
        let (lo, hi): (Option<TaskId>, Option<TaskId>) =
            sqlx::query_as("SELECT min(id), max(id) FROM tasks")
                .fetch_one(&self.pool)
                .await?;
        Ok(lo.zip(hi))
    }

    /// The first task id in `range` (from [`Queue::id_range`]) created at or after `t`, found
    /// by bisecting ids (tasks are created in id order, give or take concurrent
    /// transactions): one primary-key probe per halving of the range, never a scan. `None`
    /// when every task is older.
    pub async fn first_id_since(
        &self,
        range: (TaskId, TaskId),
        t: DateTime<Utc>,
    ) -> Result<Option<TaskId>, Error> {
        let (mut lo, hi) = range;
        // The first task at or after `id`: (its id, its creation time).
        let at = async |id: TaskId| -> Result<Option<(TaskId, DateTime<Utc>)>, Error> {
            Ok(sqlx::query_as(
                "SELECT id, created_at FROM tasks WHERE id >= $1 ORDER BY id LIMIT 1",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
        };
        match at(hi).await? {
            Some((_, c)) if c >= t => {}
            _ => return Ok(None),
        }
        // The smallest x in [lo, hi] whose first task at or after it is new enough; every x
        // up to an older task's id leads to that same task.
        let mut hi = hi;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match at(mid).await? {
                Some((id, c)) if c < t => lo = (id + 1).max(mid + 1),
                _ => hi = mid,
            }
        }
        Ok(at(lo).await?.map(|(id, _)| id))
    }

    /// Seconds from a completed task's creation to its start (its pick-up latency); `None`
    /// while it has not completed.
    pub async fn pickup_latency(&self, id: TaskId) -> Result<Option<f64>, Error> {
        let row: Option<(Option<f64>,)> = sqlx::query_as(
            "SELECT EXTRACT(EPOCH FROM started_at - created_at)::float8 FROM tasks \
             WHERE id = $1 AND status = 'completed'",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|r| r.0))
    }
}

/// The plain job kinds of a synthetic history (the tasks that are not agent runs).
pub const SYNTHETIC_KINDS: [&str; 10] = [
    "email",
    "resize",
    "report",
    "sync",
    "webhook",
    "export",
    "import",
    "thumbnail",
    "cleanup",
    "notify",
];

/// A kind of which a synthetic history holds about twenty tasks, all among its oldest: what
/// a selective filter has to find.
pub const RARE_KIND: &str = "reindex";

/// Rows per statement when seeding a synthetic history: ten statements for a million.
pub const SEED_BATCH: u64 = 100_000;

/// A synthetic task history, for `harness bench --console`: what a busy fleet's table holds
/// after `span`. Tasks are created at a steady pace, oldest first (ids grow with
/// `created_at`); per task, independently and reproducibly (hashes of the id, no
/// randomness): 93 % completed, 4 % failed (a multi-line error, 1 to 3 attempts in
/// `attempts`, retries exhausted), 1 % timeout, 1 % cancelled, 0.5 % retry_scheduled and
/// 0.5 % pending (both due a year from now, so no replica runs them), none running; 60 %
/// runs of `agent_ids` (kind `agent_kind`, payload `{"agent_id", "input"}`, a `fire_at` like
/// a cron tick's, an `ExecutionResult` as result), the rest spread over
/// [`SYNTHETIC_KINDS`], and about twenty old ones of [`RARE_KIND`]; 10 % carry the
/// idempotency key `key-<id>`; 2 % of the completed needed a second attempt.
#[derive(Debug, Clone)]
pub struct SyntheticHistory {
    pub tasks: u64,
    /// The kind of an agent run (the queue does not know the agents module).
    pub agent_kind: String,
    /// The agents whose runs make up 60 % of the tasks (none: only plain kinds).
    pub agent_ids: Vec<i64>,
    /// How far back the oldest task was created; the newest is created at `until`.
    pub span: std::time::Duration,
    pub until: DateTime<Utc>,
}

/// Ids in a seeded history that pages can be pointed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeededHistory {
    pub first_id: TaskId,
    pub last_id: TaskId,
    /// The newest failed task (with output in `task_logs`).
    pub failed_id: Option<TaskId>,
    /// A task near the middle of the history with an idempotency key (`key-<id>`).
    pub keyed_id: Option<TaskId>,
}

// One batch of a synthetic history: the ids $1..=$2 of a history starting at id $3 with $9
// tasks. Three hashes of the id pick the status (`roll`), the kind (`pick`) and the rest
// (`spin`) independently; `hashint8extended` is what hash partitioning uses, so it is stable
// across PostgreSQL versions and the history is the same on every run. Written with the
// columns a real lifecycle leaves (see attempt.rs's COMPLETE for `attempts`).
const SEED_TASKS: &str = r#"
WITH g AS (
    SELECT id, id - $3 AS i,
           abs(hashint8extended(id, 1) % 1000) AS roll,
           abs(hashint8extended(id, 2) % 1000) AS pick,
           abs(hashint8extended(id, 3) % 1000000) AS spin,
           abs(hashint8extended(id, 4) % 10) AS keyed
    FROM generate_series($1::bigint, $2::bigint) AS id),
r AS (
    SELECT id, spin, keyed,
        CASE WHEN roll < 930 THEN 'completed' WHEN roll < 970 THEN 'failed'
             WHEN roll < 980 THEN 'timeout' WHEN roll < 990 THEN 'cancelled'
             WHEN roll < 995 THEN 'retry_scheduled' ELSE 'pending' END AS status,
        CASE WHEN i % $7 = 0 AND i < 20 * $7 THEN $8
             WHEN pick < 600 AND cardinality($5::bigint[]) > 0 THEN $10
             ELSE ($6::text[])[1 + pick % cardinality($6::text[])] END AS kind,
        CASE WHEN i % $7 = 0 AND i < 20 * $7 THEN NULL
             WHEN pick < 600 AND cardinality($5::bigint[]) > 0
             THEN ($5::bigint[])[1 + spin % cardinality($5::bigint[])] END AS agent_id,
        $11::timestamptz - make_interval(secs => $4) + make_interval(secs => $4 * i / $9)
            AS created_at,
        0.05 + (spin % 200) / 100.0 AS wait_s,
        0.1 + (spin / 200 % 3000) / 100.0 AS run_s,
        1 + (spin / 7 % 3)::int AS tries
    FROM g),
a AS (
    SELECT r.*,
        CASE status WHEN 'pending' THEN 0 WHEN 'failed' THEN tries
             WHEN 'completed' THEN CASE WHEN spin % 50 = 0 THEN 2 ELSE 1 END ELSE 1 END
            AS attempt,
        CASE WHEN status = 'timeout'
             THEN 'timed out after 300.000s; the process group was terminated'
             WHEN status = 'cancelled' THEN 'cancelled'
             ELSE E'Traceback (most recent call last):\n'
                 || E'  File "job.py", line 41, in run\n    page = client.fetch(cursor)\n'
                 || E'  File "client.py", line 88, in fetch\n'
                 || E'    raise UpstreamError(resp.status, url)\n'
                 || 'UpstreamError: 503 Service Unavailable from '
                 || 'https://api.example.com/items?task=' || id END AS failure
    FROM r),
t AS (
    SELECT a.*,
        -- Attempts that did not succeed, each with its entry in `attempts`.
        CASE status WHEN 'pending' THEN 0 WHEN 'completed' THEN attempt - 1 ELSE attempt END
            AS failures,
        created_at + make_interval(secs => wait_s) AS first_start,
        created_at + make_interval(secs => wait_s + 60 * (attempt - 1)) AS started
    FROM a)
INSERT INTO tasks (id, kind, agent_id, status, payload, result, error, attempt, retry_count,
                   max_retries, timeout_ms, idempotency_key, fire_at, scheduled_at, started_at,
                   completed_at, created_at, attempts)
SELECT id, kind, agent_id, status,
    CASE WHEN agent_id IS NOT NULL THEN jsonb_build_object('agent_id', agent_id, 'input', NULL)
         ELSE jsonb_build_object('item', id, 'source', kind || '-feed') END,
    CASE WHEN status <> 'completed' THEN NULL
         WHEN agent_id IS NOT NULL THEN jsonb_build_object(
             'status', 'success',
             'result', jsonb_build_object('state', jsonb_build_object('count', spin % 5000),
                                          'summary', 'processed ' || spin % 100 || ' items'),
             'error', NULL, 'stdout', '', 'stderr', '', 'exit_code', 0,
             'duration', run_s::float8)
         ELSE jsonb_build_object('ok', true, 'items', spin % 100) END,
    CASE WHEN status NOT IN ('completed', 'pending') THEN failure END,
    attempt,
    CASE status WHEN 'pending' THEN 0 WHEN 'retry_scheduled' THEN 1 ELSE attempt - 1 END,
    -- What ends failed or timed out has used up its retries.
    CASE WHEN status IN ('failed', 'timeout') THEN attempt - 1 ELSE 3 END,
    CASE WHEN agent_id IS NOT NULL THEN 310000 END,
    CASE WHEN keyed = 0 THEN 'key-' || id END,
    CASE WHEN agent_id IS NOT NULL THEN created_at END,
    CASE WHEN status IN ('pending', 'retry_scheduled') THEN $11::timestamptz + interval '1 year'
         ELSE created_at END,
    CASE WHEN status <> 'pending' THEN started END,
    CASE WHEN status NOT IN ('pending', 'retry_scheduled')
         THEN started + make_interval(secs => run_s) END,
    created_at,
    CASE WHEN failures = 0 THEN '[]'::jsonb ELSE (
        SELECT jsonb_agg(jsonb_build_object(
            'attempt', n,
            'status', CASE WHEN status IN ('timeout', 'cancelled') THEN status ELSE 'failed' END,
            'error', failure,
            'replica', 'bench-replica-' || (1 + (id + n) % 3),
            'started_at', first_start + make_interval(secs => 60 * (n - 1)),
            'ended_at', first_start + make_interval(secs => 60 * (n - 1) + run_s)) ORDER BY n)
        FROM generate_series(1, failures) AS n) END
FROM t"#;

/// Appends a [`SyntheticHistory`] to `tasks` (ids after the largest there), in statements
/// of [`SEED_BATCH`] rows, calling `progress(done, total)` after each; gives the latest
/// attempts of a few tasks an output (the newest failed one among them); then vacuums and
/// analyzes the table, as autovacuum would have long since on a table this old.
/// For `harness bench --console`: never on a database in use.
pub async fn seed_history(
    pool: &PgPool,
    h: &SyntheticHistory,
    mut progress: impl FnMut(u64, u64),
) -> Result<SeededHistory, Error> {
    let last: Option<TaskId> = sqlx::query_scalar("SELECT max(id) FROM tasks")
        .fetch_one(pool)
        .await?;
    let first_id = last.unwrap_or(0) + 1;
    let last_id = first_id + h.tasks as i64 - 1;
    // About twenty tasks of the rare kind, one every `stride`, in the oldest 2 %.
    let stride = (h.tasks / 1000).max(1) as i64;
    let kinds: Vec<&str> = SYNTHETIC_KINDS.to_vec();
    let mut lo = first_id;
    while lo <= last_id {
        let hi = (lo + SEED_BATCH as i64 - 1).min(last_id);
        let mut tx = pool.begin().await?;
        // JIT-compiling this statement took 4.7 s, longer than running it on 2,000 rows, and
        // doubled the time of a 100,000-row batch (measured): not for this one.
        sqlx::query("SELECT set_config('jit', 'off', true)")
            .execute(&mut *tx)
            .await?;
        sqlx::query(SEED_TASKS)
            .bind(lo)
            .bind(hi)
            .bind(first_id)
            .bind(h.span.as_secs_f64())
            .bind(&h.agent_ids)
            .bind(&kinds)
            .bind(stride)
            .bind(RARE_KIND)
            .bind(h.tasks as f64)
            .bind(&h.agent_kind)
            .bind(h.until)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        progress((hi - first_id + 1) as u64, h.tasks);
        lo = hi + 1;
    }
    if h.tasks > 0 {
        // The rows came with their ids: the sequence continues after them.
        sqlx::query("SELECT setval(pg_get_serial_sequence('tasks', 'id'), $1)")
            .bind(last_id)
            .execute(pool)
            .await?;
    }
    // The primary key walked backwards from the end: the newest failed task.
    let failed_id: Option<TaskId> = sqlx::query_scalar(
        "SELECT id FROM tasks WHERE status = 'failed' AND id BETWEEN $1 AND $2 \
         ORDER BY id DESC LIMIT 1",
    )
    .bind(first_id)
    .bind(last_id)
    .fetch_optional(pool)
    .await?;
    let keyed_id: Option<TaskId> = sqlx::query_scalar(
        "SELECT id FROM tasks WHERE idempotency_key IS NOT NULL AND id BETWEEN $1 AND $2 \
         ORDER BY id LIMIT 1",
    )
    .bind(first_id + h.tasks as i64 / 2)
    .bind(last_id)
    .fetch_optional(pool)
    .await?;
    let mut with_output: Vec<TaskId> = ((last_id - 20).max(first_id)..=last_id).collect();
    with_output.extend(failed_id);
    super::logs::seed_output(pool, &with_output).await?;
    // VACUUM cannot run in a transaction: each statement on its own.
    for sql in ["VACUUM (ANALYZE) tasks", "VACUUM (ANALYZE) task_logs"] {
        sqlx::query(sql).execute(pool).await?;
    }
    Ok(SeededHistory {
        first_id,
        last_id,
        failed_id,
        keyed_id,
    })
}

/// How the `tasks` table has been read since the server's statistics were last reset
/// (pg_stat_user_tables): sequential scans and the rows they read, index scans and the rows
/// they fetched. A session publishes its counts when a transaction ends at least a second
/// after its previous report, and otherwise within [`STATS_PUBLISH_DELAY`] once idle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableReads {
    pub seq_scans: i64,
    pub seq_rows: i64,
    pub idx_scans: i64,
    pub idx_rows: i64,
}

/// The longest a PostgreSQL session (15 and later) keeps its table statistics to itself
/// while idle (`PGSTAT_IDLE_INTERVAL`).
pub const STATS_PUBLISH_DELAY: std::time::Duration = std::time::Duration::from_secs(10);

impl TableReads {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: TableReads) -> TableReads {
        TableReads {
            seq_scans: self.seq_scans - earlier.seq_scans,
            seq_rows: self.seq_rows - earlier.seq_rows,
            idx_scans: self.idx_scans - earlier.idx_scans,
            idx_rows: self.idx_rows - earlier.idx_rows,
        }
    }

    /// Rows read either way.
    pub fn rows(self) -> i64 {
        self.seq_rows + self.idx_rows
    }
}

/// See [`TableReads`]. Each call is a transaction of its own, so it never sees a cached
/// statistics snapshot.
pub async fn table_reads(pool: &PgPool) -> Result<TableReads, Error> {
    let (seq_scans, seq_rows, idx_scans, idx_rows): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT seq_scan, seq_tup_read, COALESCE(idx_scan, 0), COALESCE(idx_tup_fetch, 0) \
         FROM pg_stat_user_tables WHERE relid = 'tasks'::regclass",
    )
    .fetch_one(pool)
    .await?;
    Ok(TableReads {
        seq_scans,
        seq_rows,
        idx_scans,
        idx_rows,
    })
}
