//! The `quarantines` table: agents and kinds whose tasks no replica starts for a while,
//! after an error burst of their own (decided by a replica's governor), until their time is
//! up or — when escalated (`held`) — until a person lifts them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::worker::Target;

/// A quarantine as `harness fleet`, `agents list` and the API show it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct Quarantine {
    pub kind: String,
    pub agent_id: Option<i64>,
    /// The agent's name, for an agent's quarantine.
    pub agent: Option<String>,
    pub until: DateTime<Utc>,
    /// Escalated: in force until a person lifts it (`harness agents resume <name>`,
    /// `harness fleet resume --all`).
    pub held: bool,
    pub reason: String,
    /// The replica whose governor decided it.
    pub replica_id: String,
    pub created_at: DateTime<Utc>,
}

impl Quarantine {
    pub fn target(&self) -> Target {
        Target {
            kind: self.kind.clone(),
            agent_id: self.agent_id,
        }
    }

    /// What it stops, in words: `agent NAME` (`agent #ID` once removed) or `kind KIND`.
    pub fn what(&self) -> String {
        match (&self.agent, self.agent_id) {
            (Some(name), _) => format!("agent {name}"),
            (None, Some(id)) => format!("agent #{id}"),
            (None, None) => format!("kind {}", self.kind),
        }
    }

    /// When it ends, for the worker: far away when held.
    pub fn ends(&self) -> DateTime<Utc> {
        if self.held {
            DateTime::<Utc>::MAX_UTC
        } else {
            self.until
        }
    }
}

/// Quarantines `target` until `until` (or, `held`, until lifted); a quarantine already in
/// force is extended, never shortened.
pub async fn put(
    pool: &PgPool,
    target: &Target,
    until: DateTime<Utc>,
    held: bool,
    reason: &str,
    replica: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO quarantines (kind, agent_id, until, held, reason, replica_id) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (kind, COALESCE(agent_id, 0)) DO UPDATE SET \
             until = GREATEST(quarantines.until, EXCLUDED.until), \
             held = quarantines.held OR EXCLUDED.held, \
             reason = EXCLUDED.reason, replica_id = EXCLUDED.replica_id, created_at = now()",
    )
    .bind(&target.kind)
    .bind(target.agent_id)
    .bind(until)
    .bind(held)
    .bind(reason)
    .bind(replica)
    .execute(pool)
    .await?;
    Ok(())
}

/// The quarantines in force now.
pub async fn active(pool: &PgPool) -> Result<Vec<Quarantine>, sqlx::Error> {
    sqlx::query_as(
        "SELECT q.kind, q.agent_id, a.name AS agent, q.until, q.held, q.reason, q.replica_id, \
                q.created_at \
         FROM quarantines q LEFT JOIN agents a ON a.id = q.agent_id \
         WHERE q.held OR q.until > now() ORDER BY q.created_at",
    )
    .fetch_all(pool)
    .await
}

/// Lifts the quarantine of `target` (every quarantine for `None`). Returns how many ended.
pub async fn lift(pool: &PgPool, target: Option<&Target>) -> Result<u64, sqlx::Error> {
    let (all, kind, agent_id) = match target {
        None => (true, String::new(), None),
        Some(t) => (false, t.kind.clone(), t.agent_id),
    };
    Ok(sqlx::query(
        "DELETE FROM quarantines WHERE (held OR until > now()) AND \
         ($1 OR (kind = $2 AND agent_id IS NOT DISTINCT FROM $3))",
    )
    .bind(all)
    .bind(kind)
    .bind(agent_id)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Deletes quarantines that ended over a day ago.
pub async fn prune(pool: &PgPool) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM quarantines WHERE NOT held AND until < now() - interval '1 day'")
            .execute(pool)
            .await?
            .rows_affected(),
    )
}
