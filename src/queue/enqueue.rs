//! Enqueue: one task or many in one statement, on the pool or inside a caller's transaction,
//! with idempotency keys and cron fire keys answered by the existing task, and one NOTIFY per
//! statement that wrote a task due now.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use std::collections::HashMap;

use super::{Enqueued, Error, NewTask, Queue, Status, TaskId};

// The NOTIFY that wakes idle replicas, sent only when a row the statement wrote (`ins`, with
// its `scheduled_at`) may run now. A task delayed for later wakes nobody: a replica that woke
// for it would find nothing due and pay a claim that walks every waiting row of
// tasks_claim_idx (the index orders by priority first, so future rows cannot be skipped).
// The poll (`bulk.poll_interval_ms`) picks delayed tasks up, as it did when they woke
// replicas early. A CTE with a volatile function runs once; `LEFT JOIN woke` keeps every row.
macro_rules! notify_if_due {
    () => {
        concat!(
            ", woke AS (
    SELECT pg_notify('",
            tasks_channel!(),
            "', '') FROM ins WHERE ins.scheduled_at <= now() LIMIT 1
)"
        )
    };
}

pub(super) const INSERT_ONE: &str = concat!(
    "
WITH ins AS (
    INSERT INTO tasks (kind, payload, priority, scheduled_at, max_retries, idempotency_key,
                       agent_id, timeout_ms, fire_at, traceparent, queue, concurrency_key)
    VALUES ($1, $2, $3, COALESCE($4, now() + make_interval(secs => $5::double precision)),
            $6, $7, $8, $9, $10, $11, $12, $13)
    ON CONFLICT DO NOTHING
    RETURNING id, status, scheduled_at
)",
    notify_if_due!(),
    "
SELECT ins.id, ins.status FROM ins LEFT JOIN woke ON true"
);

// The batch's arrays as rows, numbered in input order (`ord`), and what a batch statement
// answers: the rows written, with the keys they may have conflicted on. Spelled once for both
// batch statements.
macro_rules! batch_input {
    () => {
        "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::timestamptz[],
                         $5::double precision[], $6::int[], $7::text[], $8::bigint[],
                         $9::bigint[], $10::timestamptz[], $11::text[], $12::text[], $13::text[])
        WITH ORDINALITY AS t(kind, payload, priority, run_at, delay_s, max_retries,
                             idempotency_key, agent_id, timeout_ms, fire_at, traceparent,
                             queue, concurrency_key, ord)
)"
    };
}
macro_rules! batch_answer {
    () => {
        concat!(
            notify_if_due!(),
            "
SELECT ins.id, ins.status, ins.idempotency_key, ins.agent_id, ins.fire_at
FROM ins LEFT JOIN woke ON true"
        )
    };
}

// A batch with keys. Ids are drawn in input order first (PostgreSQL evaluates a volatile
// output column after the ORDER BY sort), so the batch runs in the order it was given. Rows
// are then written in key order: two batches that share idempotency or fire keys wait for
// each other's rows in the same order and cannot deadlock (in input order, a batch of k1, k2
// and one of k2, k1 did).
pub(super) const INSERT_MANY: &str = concat!(
    batch_input!(),
    ", numbered AS (
    SELECT ord, nextval('tasks_id_seq') AS id FROM input ORDER BY ord
), ins AS (
    INSERT INTO tasks (id, kind, payload, priority, scheduled_at, max_retries,
                       idempotency_key, agent_id, timeout_ms, fire_at, traceparent, queue,
                       concurrency_key)
    SELECT n.id, kind, payload, priority,
           COALESCE(run_at, now() + make_interval(secs => delay_s)),
           max_retries, idempotency_key, agent_id, timeout_ms, fire_at, traceparent, queue,
           concurrency_key
    FROM input JOIN numbered n USING (ord)
    ORDER BY idempotency_key, agent_id, fire_at, ord
    ON CONFLICT DO NOTHING
    RETURNING id, status, idempotency_key, agent_id, fire_at, scheduled_at
)",
    batch_answer!()
);

// A batch without keys: rows are written, and ids drawn, in input order (`nextval` runs as the
// ordered SELECT produces rows). Nothing to conflict on, so nothing to deadlock on, and no
// sort or join to pay for.
pub(super) const INSERT_MANY_UNKEYED: &str = concat!(
    batch_input!(),
    ", ins AS (
    INSERT INTO tasks (kind, payload, priority, scheduled_at, max_retries, idempotency_key,
                       agent_id, timeout_ms, fire_at, traceparent, queue, concurrency_key)
    SELECT kind, payload, priority,
           COALESCE(run_at, now() + make_interval(secs => delay_s)),
           max_retries, idempotency_key, agent_id, timeout_ms, fire_at, traceparent, queue,
           concurrency_key
    FROM input ORDER BY ord
    RETURNING id, status, idempotency_key, agent_id, fire_at, scheduled_at
)",
    batch_answer!()
);

impl Queue {
    /// Enqueues one task; with an idempotency key that exists, returns that task instead.
    /// Concurrent calls share one statement and one commit (see `coalesce`); each returns once
    /// its task is committed.
    pub async fn enqueue(&self, task: NewTask) -> Result<Enqueued, Error> {
        use tracing::Instrument;
        let span = tracing::info_span!("queue.enqueue", task.kind = %task.kind);
        self.coalescer.enqueue(self, task).instrument(span).await
    }

    /// [`Queue::enqueue`] in a statement and a commit of its own.
    pub(super) async fn enqueue_alone(&self, task: NewTask) -> Result<Enqueued, Error> {
        let mut conn = self.pool.acquire().await?;
        self.enqueue_one(&mut conn, task).await
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
                .bind(&task.queue)
                .bind(&task.concurrency_key)
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
            let keys: Vec<&str> = task.idempotency_key.as_deref().into_iter().collect();
            let existing = match by_keys(conn, &keys).await?.into_values().next() {
                Some(x) => Some(x),
                None => by_fire_key(conn, task.agent_id, task.fire_at).await?,
            };
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
        let agents: Vec<Option<i64>> = tasks.iter().map(|t| t.agent_id).collect();
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
        let mut per_target: HashMap<(&str, Option<i64>), u64> = HashMap::new();
        for ((k, a), e) in kinds.iter().zip(&agents).zip(&out) {
            if !e.deduplicated {
                *per_target.entry((k.as_str(), *a)).or_default() += 1;
            }
        }
        for ((k, a), c) in per_target {
            crate::telemetry::metrics()
                .enqueued
                .add(c, &crate::telemetry::task_attrs(k, a));
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
        let c = Columns::of(&tasks, self.default_max_retries);
        let keyed = tasks
            .iter()
            .any(|t| t.idempotency_key.is_some() || t.fire_at.is_some());
        let sql = if keyed {
            INSERT_MANY
        } else {
            INSERT_MANY_UNKEYED
        };
        let mut inserted: Vec<Inserted> = sqlx::query_as(sql)
            .bind(&c.kind)
            .bind(&c.payload)
            .bind(&c.priority)
            .bind(&c.run_at)
            .bind(&c.delay_s)
            .bind(&c.max_retries)
            .bind(&c.key)
            .bind(&c.agent)
            .bind(&c.timeout)
            .bind(&c.fire)
            .bind(&c.trace)
            .bind(&c.queue)
            .bind(&c.key_of_limits)
            .fetch_all(&mut *conn)
            .await?;
        // Ids were drawn in input order; RETURNING itself promises no order.
        inserted.sort_unstable_by_key(|r| r.0);
        if inserted.len() == tasks.len() {
            return Ok(inserted
                .into_iter()
                .map(|(id, status, ..)| Enqueued {
                    id,
                    status,
                    deduplicated: false,
                })
                .collect());
        }
        match_duplicates(conn, &tasks, inserted).await
    }
}

/// A row INSERT_MANY returns: id, status, and the keys it may have conflicted on.
type Inserted = (
    TaskId,
    Status,
    Option<String>,
    Option<i64>,
    Option<DateTime<Utc>>,
);

/// The batch as INSERT_MANY's arrays.
struct Columns<'a> {
    kind: Vec<&'a str>,
    payload: Vec<&'a serde_json::Value>,
    priority: Vec<i32>,
    run_at: Vec<Option<DateTime<Utc>>>,
    delay_s: Vec<f64>,
    max_retries: Vec<i32>,
    key: Vec<Option<&'a str>>,
    agent: Vec<Option<i64>>,
    timeout: Vec<Option<i64>>,
    fire: Vec<Option<DateTime<Utc>>>,
    trace: Vec<Option<&'a str>>,
    queue: Vec<&'a str>,
    key_of_limits: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    fn of(tasks: &'a [NewTask], default_max_retries: u32) -> Columns<'a> {
        Columns {
            kind: tasks.iter().map(|t| t.kind.as_str()).collect(),
            payload: tasks.iter().map(|t| &t.payload).collect(),
            priority: tasks.iter().map(|t| t.priority).collect(),
            run_at: tasks.iter().map(|t| t.run_at).collect(),
            delay_s: tasks
                .iter()
                .map(|t| t.delay.unwrap_or_default().as_secs_f64())
                .collect(),
            max_retries: tasks
                .iter()
                .map(|t| t.max_retries.unwrap_or(default_max_retries) as i32)
                .collect(),
            key: tasks.iter().map(|t| t.idempotency_key.as_deref()).collect(),
            agent: tasks.iter().map(|t| t.agent_id).collect(),
            timeout: tasks
                .iter()
                .map(|t| t.timeout.map(|d| d.as_millis() as i64))
                .collect(),
            fire: tasks.iter().map(|t| t.fire_at).collect(),
            trace: tasks.iter().map(|t| t.traceparent.as_deref()).collect(),
            queue: tasks.iter().map(|t| t.queue.as_str()).collect(),
            key_of_limits: tasks.iter().map(|t| t.concurrency_key.as_deref()).collect(),
        }
    }
}

/// The task an agent's cron tick names (the unique `(agent_id, fire_at)`), if any.
async fn by_fire_key(
    conn: &mut PgConnection,
    agent: Option<i64>,
    fire: Option<DateTime<Utc>>,
) -> Result<Option<(TaskId, Status)>, Error> {
    // tasks_fire_key_idx.
    Ok(
        sqlx::query_as("SELECT id, status FROM tasks WHERE agent_id = $1 AND fire_at = $2")
            .bind(agent)
            .bind(fire)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// The tasks idempotency `keys` name.
async fn by_keys(
    conn: &mut PgConnection,
    keys: &[&str],
) -> Result<HashMap<String, (TaskId, Status)>, Error> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    // tasks_idempotency_key_idx.
    let rows: Vec<(TaskId, Status, String)> = sqlx::query_as(
        "SELECT id, status, idempotency_key FROM tasks WHERE idempotency_key = ANY($1)",
    )
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(i, s, k)| (k, (i, s))).collect())
}

/// Answers every entry of a batch where some hit an existing key or cron tick. Inserted rows
/// are in input order, so the first entry of each key that was inserted takes its row; later
/// entries with that key, and entries whose key or tick was taken before, report the existing
/// task as `deduplicated`.
async fn match_duplicates(
    conn: &mut PgConnection,
    tasks: &[NewTask],
    inserted: Vec<Inserted>,
) -> Result<Vec<Enqueued>, Error> {
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
    let missing: Vec<&str> = tasks
        .iter()
        .filter_map(|t| t.idempotency_key.as_deref())
        .filter(|k| !by_key.contains_key(*k))
        .collect();
    let existing_key = by_keys(conn, &missing).await?;
    let mut plain = plain.into_iter();
    let mut seen_key: std::collections::HashSet<&str> = Default::default();
    let mut seen_fire: std::collections::HashSet<(i64, DateTime<Utc>)> = Default::default();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (id, status, deduplicated) = if let Some(k) = t.idempotency_key.as_deref() {
            match by_key.get(k).copied() {
                Some((id, status)) => (id, status, !seen_key.insert(k)),
                None => {
                    // Taken before this batch, by the key or (the conflict was there) the tick.
                    let found = match existing_key.get(k).copied() {
                        Some(x) => Some(x),
                        None => by_fire_key(conn, t.agent_id, t.fire_at).await?,
                    };
                    let (id, status) = found.ok_or_else(|| Error::Invalid {
                        field: "idempotency_key",
                        reason: format!("{k:?} conflicted but its task vanished; retry"),
                    })?;
                    (id, status, true)
                }
            }
        } else if let (Some(a), Some(f)) = (t.agent_id, t.fire_at) {
            match by_fire.get(&(a, f)).copied() {
                Some((id, status)) => (id, status, !seen_fire.insert((a, f))),
                None => {
                    let (id, status) =
                        by_fire_key(conn, t.agent_id, t.fire_at)
                            .await?
                            .ok_or_else(|| Error::Invalid {
                                field: "fire_at",
                                reason: "conflicted but its task vanished; retry".into(),
                            })?;
                    (id, status, true)
                }
            }
        } else {
            let (id, status) = plain.next().expect("every plain entry was inserted");
            (id, status, false)
        };
        out.push(Enqueued {
            id,
            status,
            deduplicated,
        });
    }
    Ok(out)
}
