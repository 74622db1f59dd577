//! Enqueue: one task or many in one statement, on the pool or inside a caller's transaction,
//! with idempotency keys and cron fire keys answered by the existing task, and one NOTIFY per
//! statement.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use std::collections::HashMap;

use super::{Enqueued, Error, NewTask, Queue, Status, TaskId};

pub(super) const INSERT_ONE: &str = "
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
pub(super) const INSERT_MANY: &str = "
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

impl Queue {
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

    pub(super) async fn enqueue_one(
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

    pub(super) async fn insert_many(
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
}
