//! Transitions besides claim and completion: release and defer (back to `pending`, the
//! attempt not counted), rescue of dead replicas' tasks, cancel, what a replica holds, and
//! pruning of finished tasks.

use std::time::Duration;

use super::{Error, NOTIFY_TASKS, Queue, Status, TaskId};

// Tasks of replicas whose heartbeat is too old go back (the lost attempt counts as a retry).
// Matches tasks_status_idx (status = 'running').
// Staleness counts from the later of the last heartbeat and the server's start: after a
// restart no replica could heartbeat while the server was down, so each gets `rescue_after`
// from the restart to reconnect before its tasks are judged lost. (An outage without a restart
// is covered by the rescuer itself: see the replica's rescuer, which waits for its own
// heartbeats to have succeeded for `rescue_after`.)
pub(super) const RESCUE: &str = "
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
    /// Puts attempts `replica` holds back to `pending` without counting them (graceful
    /// shutdown of work that had not finished, a claim too old to start). Each is given as
    /// (task, attempt) and fenced like a completion: a task rescued meanwhile is not touched.
    pub async fn release(&self, replica: &str, attempts: &[(TaskId, i32)]) -> Result<u64, Error> {
        let (ids, nums): (Vec<TaskId>, Vec<i32>) = attempts.iter().copied().unzip();
        let done = sqlx::query(concat!(
            "UPDATE tasks t SET ",
            back_to_queue!(),
            " FROM unnest($1::bigint[], $2::int[]) AS u(id, attempt)
              WHERE t.id = u.id AND t.attempt = u.attempt AND t.locked_by = $3"
        ))
        .bind(&ids)
        .bind(&nums)
        .bind(replica)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() > 0 {
            sqlx::query(NOTIFY_TASKS).execute(&self.pool).await?;
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
        Ok(sqlx::query(concat!(
            "UPDATE tasks t SET ",
            back_to_queue!(),
            ", scheduled_at = now() + make_interval(secs => $4)
              WHERE t.id = $1 AND t.attempt = $2 AND t.locked_by = $3"
        ))
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
            sqlx::query(NOTIFY_TASKS).execute(&self.pool).await?;
        }
        Ok(ids)
    }

    /// Cancels a task: a pending or scheduled one at once; a running one is flagged and its
    /// owner told to abort it. Returns the status after the call.
    pub async fn cancel(&self, id: TaskId) -> Result<Status, Error> {
        let row: Option<(Status,)> = sqlx::query_as(concat!(
            "WITH c AS (
                UPDATE tasks SET
                    status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
                    cancel_requested = (status = 'running'),
                    completed_at = CASE WHEN status = 'running' THEN completed_at ELSE now() END,
                    locked_by = CASE WHEN status = 'running' THEN locked_by ELSE NULL END
                WHERE id = $1 AND status IN ('pending', 'retry_scheduled', 'running')
                RETURNING status
             )
             SELECT c.status FROM c, (SELECT pg_notify('",
            cancel_channel!(),
            "', $1::text)) n"
        ))
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
            // A task's output goes with it (task_logs has no foreign key; see the migration).
            let deleted: i64 = sqlx::query_scalar(
                "WITH d AS (DELETE FROM tasks WHERE id IN (
                    SELECT id FROM tasks
                    WHERE status IN ('completed', 'cancelled')
                      AND completed_at < now() - make_interval(secs => $1)
                    LIMIT $2) RETURNING id),
                 l AS (DELETE FROM task_logs WHERE task_id IN (SELECT id FROM d))
                 SELECT count(*) FROM d",
            )
            .bind(age.as_secs_f64())
            .bind(batch as i64)
            .fetch_one(&mut *tx)
            .await?;
            let deleted = deleted as u64;
            tx.commit().await?;
            total += deleted;
            if deleted < batch as u64 {
                return Ok(total);
            }
        }
    }
}
