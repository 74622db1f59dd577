//! Reading and administering tasks: one, a listing, counts, delete, retry, depth, and the
//! measurements `harness bench` and agent overlap rules need.

use sqlx::PgPool;
use std::collections::HashMap;

use super::{Error, Queue, Stats, Status, TASK_COLUMNS, Task, TaskFilter, TaskId};

/// Tasks per status, completed ones left out (they are most of the table, and the partial
/// indexes cover the rest).
pub async fn depth(pool: &PgPool) -> Result<Vec<(Status, i64)>, Error> {
    Ok(sqlx::query_as(
        "SELECT status, count(*) FROM tasks WHERE status <> 'completed' GROUP BY status",
    )
    .fetch_all(pool)
    .await?)
}

impl Queue {
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
