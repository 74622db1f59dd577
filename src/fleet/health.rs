//! Each replica's health history: a `metrics` row every `telemetry.log_interval_s`, a
//! `governance_events` row for every governor event, and the pruning of both past
//! `telemetry.retention_days` (one replica at a time, under an advisory lock).

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;

use super::GovernorState;

/// What a governance event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    StateChanged,
    CapacityChanged,
    Escalated,
    EscalationDelivered,
    EscalationFailed,
    Quarantined,
    QuarantineLifted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::StateChanged => "state_changed",
            EventKind::CapacityChanged => "capacity_changed",
            EventKind::Escalated => "escalated",
            EventKind::EscalationDelivered => "escalation_delivered",
            EventKind::EscalationFailed => "escalation_failed",
            EventKind::Quarantined => "quarantined",
            EventKind::QuarantineLifted => "quarantine_lifted",
        }
    }
}

const INSERT_EVENT: &str = "
INSERT INTO governance_events (replica_id, event, from_state, to_state, reason, detail)
VALUES ($1, $2, $3, $4, $5, $6)";

/// A governance event as the console lists it: when, which replica, what, why.
pub type EventLine = (
    chrono::DateTime<chrono::Utc>,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
);

/// The latest `n` governance events of the fleet, newest first.
pub async fn recent_events(pool: &PgPool, n: i64) -> Result<Vec<EventLine>, sqlx::Error> {
    // governance_events_at_idx, walked backwards.
    sqlx::query_as(
        "SELECT at, replica_id, event, from_state, to_state, reason FROM governance_events \
         ORDER BY at DESC LIMIT $1",
    )
    .bind(n)
    .fetch_all(pool)
    .await
}

/// The latest `n` escalations of the fleet: when, which replica, why.
pub async fn recent_escalations(
    pool: &PgPool,
    n: i64,
) -> Result<Vec<(chrono::DateTime<chrono::Utc>, String, String)>, sqlx::Error> {
    // governance_events_at_idx, walked backwards.
    sqlx::query_as(
        "SELECT at, replica_id, reason FROM governance_events WHERE event = 'escalated' \
         ORDER BY at DESC LIMIT $1",
    )
    .bind(n)
    .fetch_all(pool)
    .await
}

/// The fleet's work in one minute, summed over the replicas' metrics rows.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Minute {
    pub at: chrono::DateTime<chrono::Utc>,
    pub completed: i64,
    pub failed: i64,
    pub timed: i64,
    pub pickup_ms_total: f64,
}

impl Minute {
    /// The mean pick-up wait of the attempts timed in this minute, in milliseconds.
    pub fn pickup_ms(&self) -> Option<f64> {
        (self.timed > 0).then(|| self.pickup_ms_total / self.timed as f64)
    }
}

/// Per minute over the last `minutes`, oldest first, the attempts the fleet ended (succeeded,
/// failed or timed out) and their pick-up waits; minutes without a row are absent.
pub async fn minutes(pool: &PgPool, minutes: i64) -> Result<Vec<Minute>, sqlx::Error> {
    // metrics_recorded_idx: a range of the last hour, a few rows per replica and minute.
    sqlx::query_as(
        "SELECT date_trunc('minute', recorded_at) AS at, sum(completed)::bigint AS completed, \
                sum(failed)::bigint AS failed, sum(timed)::bigint AS timed, \
                sum(pickup_ms_total)::float8 AS pickup_ms_total \
         FROM metrics WHERE recorded_at > now() - make_interval(mins => $1::int) \
         GROUP BY 1 ORDER BY 1",
    )
    .bind(minutes as i32)
    .fetch_all(pool)
    .await
}

/// One replica's sample as the fleet page charts it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Sample {
    pub replica_id: String,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub cpu_percent: f32,
    pub memory_percent: f32,
    pub running: i32,
    pub capacity: i32,
}

/// The metrics rows of the last `minutes` of `replicas`, oldest first.
pub async fn samples(
    pool: &PgPool,
    replicas: &[String],
    minutes: i64,
) -> Result<Vec<Sample>, sqlx::Error> {
    // metrics_replica_recorded_idx: one range per replica.
    sqlx::query_as(
        "SELECT replica_id, recorded_at, cpu_percent, memory_percent, running, capacity \
         FROM metrics WHERE replica_id = ANY($1) \
           AND recorded_at > now() - make_interval(mins => $2::int) \
         ORDER BY replica_id, recorded_at",
    )
    .bind(replicas)
    .bind(minutes as i32)
    .fetch_all(pool)
    .await
}

/// Records one governance event of `replica`.
pub async fn record_event(
    pool: &PgPool,
    replica: &str,
    kind: EventKind,
    from: Option<GovernorState>,
    to: Option<GovernorState>,
    reason: &str,
    detail: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(INSERT_EVENT)
        .bind(replica)
        .bind(kind.as_str())
        .bind(from.map(GovernorState::as_str))
        .bind(to.map(GovernorState::as_str))
        .bind(reason)
        .bind(detail)
        .execute(pool)
        .await
        .map(|_| ())
}

/// One health sample of a replica, as the `metrics` table keeps it.
#[derive(Debug, Clone)]
pub struct MetricsRow {
    pub cpu_percent: f64,
    pub memory_percent: f64,
    pub memory_available_mb: u64,
    pub capacity: usize,
    pub running: usize,
    /// Attempts ended since the previous row.
    pub completed: u64,
    pub failed: u64,
    /// Attempts ended since the previous row whose pick-up wait was timed, and the sum of
    /// those waits in milliseconds.
    pub timed: u64,
    pub pickup_ms_total: f64,
    pub state: GovernorState,
}

/// Writes one `metrics` row of `replica`.
pub async fn record_metrics(
    pool: &PgPool,
    replica: &str,
    m: &MetricsRow,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO metrics (replica_id, cpu_percent, memory_percent, memory_available_mb, \
         capacity, running, completed, failed, timed, pickup_ms_total, state) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(replica)
    .bind(m.cpu_percent as f32)
    .bind(m.memory_percent as f32)
    .bind(m.memory_available_mb as i64)
    .bind(m.capacity as i32)
    .bind(m.running as i32)
    .bind(m.completed as i64)
    .bind(m.failed as i64)
    .bind(m.timed as i64)
    .bind(m.pickup_ms_total)
    .bind(m.state.as_str())
    .execute(pool)
    .await
    .map(|_| ())
}

/// A governor's day in the life, repeated by [`seed_for_bench`]: (event, from, to, reason).
fn bench_events() -> [(
    EventKind,
    Option<GovernorState>,
    Option<GovernorState>,
    &'static str,
); 10] {
    use GovernorState::{Holding, Normal, Paused, Throttled};
    [
        (
            EventKind::StateChanged,
            Some(Normal),
            Some(Throttled),
            "cpu 91% over 30 s",
        ),
        (EventKind::CapacityChanged, None, None, "capacity 8 -> 4"),
        (
            EventKind::StateChanged,
            Some(Throttled),
            Some(Normal),
            "cpu under 80% for 60 s",
        ),
        (EventKind::CapacityChanged, None, None, "capacity 4 -> 8"),
        (
            EventKind::Quarantined,
            None,
            None,
            "agent agent-007 failed 5 times in 60 s",
        ),
        (
            EventKind::QuarantineLifted,
            None,
            None,
            "quarantine of agent agent-007 expired",
        ),
        (
            EventKind::StateChanged,
            Some(Normal),
            Some(Paused),
            "error burst: 20 failures in 60 s",
        ),
        (
            EventKind::Escalated,
            Some(Paused),
            Some(Holding),
            "3 pause bursts in a row",
        ),
        (
            EventKind::EscalationDelivered,
            None,
            None,
            "webhook answered 200",
        ),
        (
            EventKind::StateChanged,
            Some(Holding),
            Some(Normal),
            "resumed by a person",
        ),
    ]
}

/// Writes a health history for `harness bench --console`: a `metrics` row of each of
/// `replicas` every `every` over the last `span`, and `events` governance events spread over
/// the same span, taking turns among the replicas.
pub async fn seed_for_bench(
    pool: &PgPool,
    replicas: &[String],
    span: Duration,
    every: Duration,
    events: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO metrics (replica_id, recorded_at, cpu_percent, memory_percent, \
             memory_available_mb, capacity, running, completed, failed, state) \
         SELECT r.id, t, 20 + (extract(epoch FROM t)::bigint % 60), \
                35 + (extract(epoch FROM t)::bigint % 20), 12000, 8, \
                (extract(epoch FROM t)::bigint % 9)::int, extract(epoch FROM t)::bigint % 40, \
                extract(epoch FROM t)::bigint % 3, $4 \
         FROM unnest($1::text[]) AS r(id) \
         CROSS JOIN generate_series(now() - make_interval(secs => $2), now(), \
                                    make_interval(secs => $3)) AS t",
    )
    .bind(replicas)
    .bind(span.as_secs_f64())
    .bind(every.as_secs_f64().max(1.0))
    .bind(GovernorState::Normal.as_str())
    .execute(pool)
    .await?;
    let cycle = bench_events();
    let kind: Vec<&str> = cycle.iter().map(|e| e.0.as_str()).collect();
    let from: Vec<Option<&str>> = cycle
        .iter()
        .map(|e| e.1.map(GovernorState::as_str))
        .collect();
    let to: Vec<Option<&str>> = cycle
        .iter()
        .map(|e| e.2.map(GovernorState::as_str))
        .collect();
    let reason: Vec<&str> = cycle.iter().map(|e| e.3).collect();
    sqlx::query(
        "INSERT INTO governance_events (replica_id, at, event, from_state, to_state, reason) \
         SELECT ($1::text[])[1 + k % cardinality($1::text[])], \
                now() - make_interval(secs => $3 * (k + 0.5) / $2), \
                e.event, e.from_state, e.to_state, e.reason \
         FROM generate_series(0, $2 - 1) AS k \
         JOIN unnest($4::text[], $5::text[], $6::text[], $7::text[]) WITH ORDINALITY \
              AS e(event, from_state, to_state, reason, n) \
           ON e.n = 1 + (($2 - 1 - k) % cardinality($4::text[]))",
    )
    .bind(replicas)
    .bind(events)
    .bind(span.as_secs_f64())
    .bind(&kind)
    .bind(&from)
    .bind(&to)
    .bind(&reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes metrics and events past `retention`, by one replica at a time (others skip).
pub async fn prune(pool: &PgPool, retention: Duration) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mine: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('harness:prune-metrics'))")
            .fetch_one(&mut *tx)
            .await?;
    if mine {
        // metrics_recorded_idx and governance_events_at_idx.
        for sql in [
            "DELETE FROM metrics WHERE recorded_at < now() - make_interval(secs => $1)",
            "DELETE FROM governance_events WHERE at < now() - make_interval(secs => $1)",
        ] {
            sqlx::query(sql)
                .bind(retention.as_secs_f64())
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await
}
