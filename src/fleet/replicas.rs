//! The `replicas` table: each replica registers a row, heartbeats it on a dedicated connection
//! (so a busy worker cannot starve it) and removes it on exit; the scheduler marks its
//! leadership and the governor its state here. [`crate::queue::Queue::rescue`] reads these
//! rows to find the tasks of dead replicas.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};

use super::GovernorState;
use crate::queue::Error;

/// A unique replica id: host name plus a random suffix, e.g. `web-1-4f9c2a`.
pub fn new_replica_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "replica".to_string());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// The heartbeat connection of one replica.
pub struct Heartbeat {
    options: PgConnectOptions,
    replica: String,
    conn: Option<PgConnection>,
    /// The queues it serves with their capacities, as `replicas.queues` holds them.
    queues: serde_json::Value,
}

const BEAT: &str = "
INSERT INTO replicas (id, hostname, pid, version, running, capacity, heartbeat_at, queues)
VALUES ($1, $2, $3, $4, $5, $6, now(), $7)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), running = $5, capacity = $6, queues = $7";

impl Heartbeat {
    /// A heartbeat of `replica` on connections opened with `options` (a session of its own:
    /// it sets a session `statement_timeout`), named `harness-heartbeat <replica>` in
    /// `pg_stat_activity`.
    pub fn new(options: PgConnectOptions, replica: &str) -> Heartbeat {
        Heartbeat {
            options: options.application_name(&format!("harness-heartbeat {replica}")),
            replica: replica.to_string(),
            conn: None,
            queues: serde_json::json!({}),
        }
    }

    /// The queues the replica serves, with its capacity for each (what `harness fleet` and
    /// `harness queues` show).
    pub fn serving(mut self, queues: &[(String, usize)]) -> Heartbeat {
        self.queues = queues
            .iter()
            .map(|(q, n)| (q.clone(), serde_json::json!(n)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        self
    }

    /// Records that the replica is alive (registering it on the first beat or after its row
    /// was removed). Reconnects when the connection was lost; never waits more than `limit`.
    pub async fn beat(
        &mut self,
        running: i32,
        capacity: i32,
        limit: Duration,
    ) -> Result<(), Error> {
        let fut = async {
            if self.conn.is_none() {
                let mut c = self.options.connect().await?;
                // A stuck statement must not hold up the next beat for long.
                sqlx::query("SET statement_timeout = '5s'")
                    .execute(&mut c)
                    .await?;
                self.conn = Some(c);
            }
            let conn = self.conn.as_mut().expect("just connected");
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default();
            sqlx::query(BEAT)
                .bind(&self.replica)
                .bind(host)
                .bind(std::process::id() as i32)
                .bind(env!("CARGO_PKG_VERSION"))
                .bind(running)
                .bind(capacity)
                .bind(&self.queues)
                .execute(conn)
                .await?;
            Ok::<_, sqlx::Error>(())
        };
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e.into())
            }
            Err(_) => {
                self.conn = None;
                Err(Error::Db(sqlx::Error::PoolTimedOut))
            }
        }
    }

    /// Removes the replica's row (clean exit).
    pub async fn deregister(&mut self) -> Result<(), Error> {
        if self.conn.is_none() {
            self.conn = Some(self.options.connect().await?);
        }
        let conn = self.conn.as_mut().expect("connected");
        sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(&self.replica)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// Records (or clears) this replica's scheduler leadership; becoming leader clears the flag
/// of any other row (a dead leader's, say).
pub async fn set_leader(pool: &sqlx::PgPool, replica: &str, leader: bool) -> Result<(), Error> {
    if leader {
        sqlx::query(
            "UPDATE replicas SET is_leader = (id = $1), \
                 leader_since = CASE WHEN id = $1 THEN now() END \
             WHERE is_leader OR id = $1",
        )
        .bind(replica)
        .execute(pool)
        .await?;
    } else {
        sqlx::query("UPDATE replicas SET is_leader = false, leader_since = NULL WHERE id = $1")
            .bind(replica)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// A replica as `harness fleet` shows it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct ReplicaRow {
    pub id: String,
    pub hostname: String,
    pub pid: i32,
    pub version: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub heartbeat_at: chrono::DateTime<chrono::Utc>,
    /// Seconds since the last heartbeat.
    pub heartbeat_age_s: f64,
    pub is_leader: bool,
    pub leader_since: Option<chrono::DateTime<chrono::Utc>>,
    pub governor_state: GovernorState,
    pub capacity: i32,
    pub running: i32,
    pub isolation: Option<String>,
    /// The queues it serves, with its capacity for each.
    #[sqlx(json)]
    pub queues: std::collections::BTreeMap<String, i64>,
    /// From the replica's latest metrics row.
    pub cpu_percent: Option<f32>,
    pub memory_percent: Option<f32>,
    pub resume_requested_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Replicas whose heartbeat is younger than `max_age`, leader first.
pub async fn list(pool: &sqlx::PgPool, max_age: Duration) -> Result<Vec<ReplicaRow>, Error> {
    Ok(sqlx::query_as(
        "SELECT r.id, r.hostname, r.pid, r.version, r.started_at, r.heartbeat_at, \
                EXTRACT(EPOCH FROM now() - r.heartbeat_at)::float8 AS heartbeat_age_s, \
                r.is_leader, r.leader_since, r.governor_state, r.capacity, r.running, r.isolation, \
                r.queues, \
                m.cpu_percent, m.memory_percent, r.resume_requested_at \
         FROM replicas r \
         LEFT JOIN LATERAL ( \
             SELECT cpu_percent, memory_percent FROM metrics \
             WHERE replica_id = r.id ORDER BY recorded_at DESC LIMIT 1) m ON true \
         WHERE r.heartbeat_at > now() - make_interval(secs => $1) \
         ORDER BY r.is_leader DESC, r.started_at",
    )
    .bind(max_age.as_secs_f64())
    .fetch_all(pool)
    .await?)
}

/// Records the state `replica`'s governor is in (and the executor's isolation mode).
pub async fn set_governor_state(
    pool: &sqlx::PgPool,
    replica: &str,
    state: GovernorState,
    isolation: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE replicas SET governor_state = $2, isolation = COALESCE($3, isolation) WHERE id = $1",
    )
    .bind(replica)
    .bind(state.as_str())
    .bind(isolation)
    .execute(pool)
    .await
    .map(|_| ())
}

/// When a person last asked `replica` to resume (`harness fleet resume`), if ever.
pub async fn resume_requested(
    pool: &sqlx::PgPool,
    replica: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT resume_requested_at FROM replicas WHERE id = $1")
        .bind(replica)
        .fetch_optional(pool)
        .await
        .map(Option::flatten)
}

/// Forgets a resume request once `replica` has resumed.
pub async fn clear_resume(pool: &sqlx::PgPool, replica: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE replicas SET resume_requested_at = NULL WHERE id = $1")
        .bind(replica)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Asks a replica (or every replica) to leave its hold; it does so at its next sample.
/// Returns how many replicas were asked.
pub async fn request_resume(
    pool: &sqlx::PgPool,
    replica: Option<&str>,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE replicas SET resume_requested_at = now() WHERE $1::text IS NULL OR id = $1",
    )
    .bind(replica)
    .execute(pool)
    .await?
    .rows_affected())
}
