//! State handed from one agent run to the next.
//!
//! After a successful run the next state is `result.state` when the result has one, else the
//! result itself, and the summary is `result.summary`. The artifact is written in the same
//! transaction that completes the task (see [`write_in`]), and the unique
//! `(agent_id, run_number)` fences two racing runs: only one of them can write run N+1.
//! A failed run writes nothing, so the previous state stands. The newest
//! [`HISTORY`] artifacts per agent are kept.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sqlx::{PgConnection, PgPool};

/// Artifacts kept per agent.
pub const HISTORY: i64 = 20;
/// State larger than this (serialised, in characters) is compressed.
pub const MAX_STATE_SIZE: usize = 10_000;

/// The state of one run, as the next run sees it (`self.handoff`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct HandoffArtifact {
    pub agent_id: i64,
    pub run_number: i64,
    pub state: Value,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
    pub compressed: bool,
    pub summary: Option<String>,
}

impl HandoffArtifact {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("artifact serialises")
    }
    pub fn from_json(s: &str) -> Result<HandoffArtifact, serde_json::Error> {
        serde_json::from_str(s)
    }
}

/// What a successful run hands to the next one (written by the queue's completion).
#[derive(Debug, Clone, PartialEq)]
pub struct HandoffWrite {
    pub agent_id: i64,
    /// The run number this artifact gets: the previous one + 1.
    pub run_number: i64,
    pub state: Value,
    pub summary: Option<String>,
    pub metadata: Value,
    pub compressed: bool,
}

impl HandoffWrite {
    /// The artifact that follows `previous` after a run that returned `result`.
    pub fn next(
        agent_id: i64,
        previous: Option<&HandoffArtifact>,
        result: &Value,
        metadata: Value,
    ) -> HandoffWrite {
        let state = match result.get("state") {
            Some(s) => s.clone(),
            None => result.clone(),
        };
        let summary = result.get("summary").and_then(|s| match s {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        });
        let (state, compressed) = compress_state(state, MAX_STATE_SIZE);
        HandoffWrite {
            agent_id,
            run_number: previous.map_or(0, |p| p.run_number) + 1,
            state,
            summary,
            metadata,
            compressed,
        }
    }
}

/// Keys kept whatever their size.
const ESSENTIAL: [&str; 3] = ["status", "error", "count"];
/// Items of a list kept when compressing.
const KEEP_ITEMS: usize = 100;

fn size(v: &Value) -> usize {
    serde_json::to_string(v).map_or(0, |s| s.chars().count())
}

/// Shrinks `state` when its JSON exceeds `max_size` characters: lists keep their last 100
/// items; then the largest values other than `status`, `error` and `count` are dropped until
/// it fits. Returns the state and whether anything was removed.
pub fn compress_state(state: Value, max_size: usize) -> (Value, bool) {
    if size(&state) <= max_size {
        return (state, false);
    }
    let Value::Object(map) = state else {
        // Not an object: only a list can be trimmed.
        return match state {
            Value::Array(items) => {
                let skip = items.len().saturating_sub(KEEP_ITEMS);
                (Value::Array(items.into_iter().skip(skip).collect()), true)
            }
            other => (other, false),
        };
    };
    let mut map: Map<String, Value> = map
        .into_iter()
        .map(|(k, v)| match v {
            Value::Array(items) if items.len() > KEEP_ITEMS => {
                let skip = items.len() - KEEP_ITEMS;
                (k, Value::Array(items.into_iter().skip(skip).collect()))
            }
            v => (k, v),
        })
        .collect();
    // Each value's share of the serialised object, measured once: `"key":value,`.
    let mut total = size(&Value::Object(map.clone()));
    if total > max_size {
        let mut candidates: Vec<(usize, String)> = map
            .iter()
            .filter(|(k, _)| !ESSENTIAL.contains(&k.as_str()))
            .map(|(k, v)| (size(&Value::String(k.clone())) + 1 + size(v) + 1, k.clone()))
            .collect();
        // Largest first; ties by key, so the result does not depend on map order.
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (share, key) in candidates {
            if total <= max_size {
                break;
            }
            map.remove(&key);
            total = total.saturating_sub(share);
        }
    }
    (Value::Object(map), true)
}

// Only for agents that still exist: the join locks each agent row (KEY SHARE) until commit,
// and skips one deleted meanwhile, so a removed agent never fails the completion that carries
// its handoff (the foreign key would refuse the whole batch).
const INSERT: &str = "
INSERT INTO handoffs (agent_id, run_number, state, summary, metadata, compressed)
SELECT u.agent_id, u.run_number, u.state, u.summary, u.metadata, u.compressed
FROM unnest($1::bigint[], $2::bigint[], $3::jsonb[], $4::text[], $5::jsonb[], $6::bool[])
         AS u(agent_id, run_number, state, summary, metadata, compressed)
JOIN agents a ON a.id = u.agent_id
FOR KEY SHARE OF a
ON CONFLICT (agent_id, run_number) DO NOTHING
RETURNING agent_id";

/// Writes artifacts on the caller's transaction (the one completing their tasks). An
/// artifact whose run number is taken (a racing run got there first), or whose agent has
/// been removed, is dropped and logged; returns how many were written. Old artifacts beyond
/// [`HISTORY`] are removed.
pub async fn write_in(
    conn: &mut PgConnection,
    writes: &[HandoffWrite],
) -> Result<u64, sqlx::Error> {
    if writes.is_empty() {
        return Ok(0);
    }
    let agent: Vec<i64> = writes.iter().map(|w| w.agent_id).collect();
    let run: Vec<i64> = writes.iter().map(|w| w.run_number).collect();
    let state: Vec<&Value> = writes.iter().map(|w| &w.state).collect();
    let summary: Vec<Option<&str>> = writes.iter().map(|w| w.summary.as_deref()).collect();
    let meta: Vec<&Value> = writes.iter().map(|w| &w.metadata).collect();
    let compressed: Vec<bool> = writes.iter().map(|w| w.compressed).collect();
    let written: Vec<i64> = sqlx::query_scalar(INSERT)
        .bind(&agent)
        .bind(&run)
        .bind(&state)
        .bind(&summary)
        .bind(&meta)
        .bind(&compressed)
        .fetch_all(&mut *conn)
        .await?;
    if written.len() < writes.len() {
        let gone: Vec<i64> = sqlx::query_scalar(
            "SELECT u.id FROM unnest($1::bigint[]) AS u(id) \
             WHERE NOT EXISTS (SELECT 1 FROM agents a WHERE a.id = u.id)",
        )
        .bind(&agent)
        .fetch_all(&mut *conn)
        .await?;
        if !gone.is_empty() {
            tracing::warn!(agents = ?gone, "handoff not written: the agent was removed while it ran");
        }
        if written.len() + gone.len() < writes.len() {
            tracing::warn!(
                dropped = writes.len() - written.len() - gone.len(),
                "handoff not written: a racing run of the same agent wrote that run number first"
            );
        }
    }
    sqlx::query(
        "DELETE FROM handoffs h USING (
            SELECT id FROM (
                SELECT id, row_number() OVER (PARTITION BY agent_id ORDER BY run_number DESC) AS n
                FROM handoffs WHERE agent_id = ANY($1)) r
            WHERE r.n > $2) old
         WHERE h.id = old.id",
    )
    .bind(&written)
    .bind(HISTORY)
    .execute(&mut *conn)
    .await?;
    Ok(written.len() as u64)
}

/// Reads and clears agents' handoff artifacts.
#[derive(Debug, Clone)]
pub struct HandoffManager {
    pool: PgPool,
}

const SELECT: &str =
    "SELECT agent_id, run_number, state, metadata, created_at, compressed, summary FROM handoffs";

impl HandoffManager {
    pub fn new(pool: PgPool) -> HandoffManager {
        HandoffManager { pool }
    }

    /// The current artifact of an agent (its newest run), if any.
    pub async fn load_artifact(
        &self,
        agent_id: i64,
    ) -> Result<Option<HandoffArtifact>, sqlx::Error> {
        sqlx::query_as(&format!(
            "{SELECT} WHERE agent_id = $1 ORDER BY run_number DESC LIMIT 1"
        ))
        .bind(agent_id)
        .fetch_optional(&self.pool)
        .await
    }

    /// The kept artifacts of an agent, newest first.
    pub async fn history(&self, agent_id: i64) -> Result<Vec<HandoffArtifact>, sqlx::Error> {
        sqlx::query_as(&format!(
            "{SELECT} WHERE agent_id = $1 ORDER BY run_number DESC"
        ))
        .bind(agent_id)
        .fetch_all(&self.pool)
        .await
    }

    /// Saves an artifact directly (outside a task completion).
    pub async fn save_artifact(&self, write: &HandoffWrite) -> Result<bool, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        Ok(write_in(&mut conn, std::slice::from_ref(write)).await? == 1)
    }

    /// Forgets every artifact of an agent: its next run starts with no handoff.
    pub async fn clear_artifact(&self, agent_id: i64) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query("DELETE FROM handoffs WHERE agent_id = $1")
            .bind(agent_id)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}

/// The artifact as the agent process receives it (`self.handoff`), or null.
pub fn for_agent(a: Option<&HandoffArtifact>) -> Value {
    match a {
        Some(a) => json!({
            "agent_id": a.agent_id,
            "run_number": a.run_number,
            "state": a.state,
            "summary": a.summary,
            "metadata": a.metadata,
            "compressed": a.compressed,
            "created_at": a.created_at,
        }),
        None => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_state_is_untouched() {
        let s = json!({"count": 3, "items": [1, 2, 3]});
        assert_eq!(compress_state(s.clone(), 10_000), (s, false));
    }

    #[test]
    fn lists_keep_their_last_hundred_items() {
        let s = json!({"items": (0..5000).collect::<Vec<_>>(), "count": 5000});
        let (c, compressed) = compress_state(s, 10_000);
        assert!(compressed);
        let items = c["items"].as_array().unwrap();
        assert_eq!(items.len(), 100);
        assert_eq!(items[0], 4900);
        assert_eq!(items[99], 4999);
        assert_eq!(c["count"], 5000);
    }

    #[test]
    fn largest_non_essential_values_go_first_and_essentials_stay() {
        let s = json!({
            "status": "x".repeat(3000),
            "error": "e".repeat(3000),
            "count": 7,
            "big": "b".repeat(6000),
            "medium": "m".repeat(2000),
            "small": "s",
        });
        let (c, compressed) = compress_state(s, 10_000);
        assert!(compressed);
        assert!(c.get("big").is_none(), "the largest went");
        assert!(c.get("medium").is_some(), "only as much as needed went");
        assert_eq!(c["count"], 7);
        assert!(c.get("status").is_some() && c.get("error").is_some());
        assert!(size(&c) <= 10_000);
    }

    #[test]
    fn thousands_of_keys_compress_quickly() {
        let s: serde_json::Map<String, Value> = (0..8000)
            .map(|i| (format!("k{i}"), json!("v".repeat(500))))
            .collect();
        let started = std::time::Instant::now();
        let (c, compressed) = compress_state(Value::Object(s), 10_000);
        assert!(compressed);
        assert!(size(&c) <= 10_000, "{}", size(&c));
        // Linear: milliseconds even in a debug build on a busy machine. The quadratic
        // version this replaced took 29 s.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn essentials_alone_may_stay_over_the_limit() {
        let s = json!({"status": "x".repeat(20_000), "other": 1});
        let (c, compressed) = compress_state(s, 10_000);
        assert!(compressed);
        assert_eq!(c.as_object().unwrap().len(), 1);
        assert!(c.get("status").is_some());
    }

    #[test]
    fn next_artifact_takes_result_state_and_summary() {
        let prev = HandoffArtifact {
            agent_id: 1,
            run_number: 4,
            state: json!({}),
            metadata: json!({}),
            created_at: Utc::now(),
            compressed: false,
            summary: None,
        };
        let w = HandoffWrite::next(
            1,
            Some(&prev),
            &json!({"state": {"n": 5}, "summary": "five"}),
            json!({}),
        );
        assert_eq!(
            (w.run_number, w.state, w.summary.as_deref()),
            (5, json!({"n": 5}), Some("five"))
        );
        let w = HandoffWrite::next(1, None, &json!({"n": 1}), json!({}));
        assert_eq!((w.run_number, w.state), (1, json!({"n": 1})));
    }

    #[test]
    fn artifact_json_has_the_documented_fields_and_reads_back() {
        let a = HandoffArtifact {
            agent_id: 1,
            run_number: 5,
            state: json!({"count": 42, "last_value": "xyz"}),
            metadata: json!({"task_id": 9}),
            created_at: Utc::now(),
            compressed: false,
            summary: Some("Processed 42 items".into()),
        };
        let v: serde_json::Value = serde_json::from_str(&a.to_json()).unwrap();
        assert_eq!(
            v,
            json!({
                "agent_id": 1, "run_number": 5,
                "state": {"count": 42, "last_value": "xyz"}, "metadata": {"task_id": 9},
                "created_at": a.created_at, "compressed": false, "summary": "Processed 42 items",
            })
        );
        assert_eq!(HandoffArtifact::from_json(&a.to_json()).unwrap(), a);
    }
}
