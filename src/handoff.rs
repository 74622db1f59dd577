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
use serde_json::{Value, json};
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

/// Shrinks `state` when its JSON exceeds `max_size` characters, so that what is stored is at
/// most `max_size`, in this order, each step only as far as needed:
/// 1. every list, at any depth, keeps its last 100 items;
/// 2. long strings, at any depth, keep their end behind a `[… N chars trimmed …]` marker,
///    all cut to the largest common length that fits (not below 64 characters);
/// 3. lists keep fewer of their last items (down to one);
/// 4. the largest top-level values other than `status`, `error` and `count` are dropped;
/// 5. what is left (the essentials, or a list's last item) becomes text where it is
///    structured, and its strings are cut further, down to the marker alone.
///
/// `status`, `error` and `count` always survive as keys. Returns the state and whether
/// anything was removed.
pub fn compress_state(state: Value, max_size: usize) -> (Value, bool) {
    if size(&state) <= max_size {
        return (state, false);
    }
    let mut state = cap(state, usize::MAX, KEEP_ITEMS);
    if size(&state) > max_size {
        let len = largest_fitting(MIN_STRING, longest_string(&state), |l| {
            sized(&state, l, usize::MAX) <= max_size
        });
        state = cap(state, len.unwrap_or(MIN_STRING), usize::MAX);
    }
    if size(&state) > max_size {
        let items = largest_fitting(1, KEEP_ITEMS, |k| sized(&state, usize::MAX, k) <= max_size);
        state = cap(state, usize::MAX, items.unwrap_or(1));
    }
    if size(&state) > max_size
        && let Value::Object(mut map) = state
    {
        // Each value's share of the serialised object, measured once: `"key":value,`.
        let mut total = size(&Value::Object(map.clone()));
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
        state = Value::Object(map);
    }
    if size(&state) > max_size {
        // Only essentials (or a list or string) are left: strings all the way down to their
        // marker; a structured essential becomes its JSON text, which can be cut too.
        match &mut state {
            Value::Object(map) => {
                for v in map.values_mut() {
                    if matches!(v, Value::Array(_) | Value::Object(_)) {
                        *v = Value::String(v.to_string());
                    }
                }
            }
            // A list that is still too large (its last item alone): its JSON text, cut.
            Value::Array(_) => state = Value::String(state.to_string()),
            _ => {}
        }
        let len = largest_fitting(0, longest_string(&state), |l| {
            sized(&state, l, usize::MAX) <= max_size
        });
        state = cap(state, len.unwrap_or(0), usize::MAX);
    }
    (state, true)
}

/// Strings are not cut below this length while whole values may still be dropped instead.
const MIN_STRING: usize = 64;

/// The largest `n` in `lo..=hi` for which `fits(n)` holds (`fits` is monotonic: true up to
/// some point), or `None` when not even `lo` fits.
fn largest_fitting(lo: usize, hi: usize, fits: impl Fn(usize) -> bool) -> Option<usize> {
    if hi < lo || !fits(lo) {
        return None;
    }
    let (mut good, mut bad) = (lo, hi.saturating_add(1));
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if fits(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Some(good)
}

fn longest_string(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Array(items) => items.iter().map(longest_string).max().unwrap_or(0),
        Value::Object(map) => map.values().map(longest_string).max().unwrap_or(0),
        _ => 0,
    }
}

/// A string cut to `len` characters: its last ones behind the marker (the whole of it when
/// the marker would be longer than the cut).
fn cut(s: &str, len: usize) -> String {
    let chars = s.chars().count();
    if chars <= len {
        return s.to_string();
    }
    let marker = |n: usize| format!("[… {n} chars trimmed …]");
    let keep = len.saturating_sub(marker(chars).chars().count());
    let tail: String = s.chars().skip(chars - keep).collect();
    format!("{}{tail}", marker(chars - keep))
}

/// `v` with strings cut to `str_len` and lists cut to their last `items`.
fn cap(v: Value, str_len: usize, items: usize) -> Value {
    match v {
        Value::String(s) if s.chars().count() > str_len => Value::String(cut(&s, str_len)),
        Value::Array(list) => {
            let skip = list.len().saturating_sub(items);
            Value::Array(
                list.into_iter()
                    .skip(skip)
                    .map(|x| cap(x, str_len, items))
                    .collect(),
            )
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, x)| (k, cap(x, str_len, items)))
                .collect(),
        ),
        other => other,
    }
}

/// The size [`cap`] would give, without building it.
fn sized(v: &Value, str_len: usize, items: usize) -> usize {
    match v {
        Value::String(s) if s.chars().count() > str_len => size(&Value::String(cut(s, str_len))),
        Value::Array(list) => {
            let skip = list.len().saturating_sub(items);
            let kept = list.len() - skip;
            2 + kept.saturating_sub(1)
                + list[skip..]
                    .iter()
                    .map(|x| sized(x, str_len, items))
                    .sum::<usize>()
        }
        Value::Object(map) => {
            2 + map.len().saturating_sub(1)
                + map
                    .iter()
                    .map(|(k, x)| size(&Value::String(k.clone())) + 1 + sized(x, str_len, items))
                    .sum::<usize>()
        }
        other => size(other),
    }
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

/// Gives each of `agent_ids` a handoff history of `per_agent` runs (at most [`HISTORY`], the
/// newest five minutes ago, one every five minutes before), for `harness bench --console`:
/// states and summaries like a small agent's, metadata like a run's. Returns the rows written.
pub async fn seed_for_bench(
    pool: &PgPool,
    agent_ids: &[i64],
    per_agent: i64,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO handoffs (agent_id, run_number, state, summary, metadata, created_at) \
         SELECT a.id, r, jsonb_build_object('count', r, 'cursor', 'page-' || r), \
                'run ' || r || ' processed 50 items', \
                jsonb_build_object('status', 'success', 'duration', 0.4), \
                now() - make_interval(mins => (5 * ($2 - r + 1))::int) \
         FROM unnest($1::bigint[]) AS a(id) CROSS JOIN generate_series(1, $2) AS r",
    )
    .bind(agent_ids)
    .bind(per_agent.clamp(0, HISTORY))
    .execute(pool)
    .await?
    .rows_affected())
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
    fn long_strings_are_cut_keeping_their_end_before_values_are_dropped() {
        let s = json!({
            "status": "x".repeat(3000),
            "error": "e".repeat(3000),
            "count": 7,
            "big": format!("{}THE END", "b".repeat(6000)),
            "medium": "m".repeat(2000),
            "small": "s",
        });
        let (c, compressed) = compress_state(s, 10_000);
        assert!(compressed);
        assert!(size(&c) <= 10_000, "{}", size(&c));
        let big = c["big"].as_str().unwrap();
        assert!(big.starts_with("[… ") && big.ends_with("THE END"), "{big}");
        assert_eq!(c["small"], "s");
        assert_eq!(c["count"], 7);
        assert!(c.get("status").is_some() && c.get("error").is_some());
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
    fn essentials_are_cut_too_and_survive() {
        let s = json!({"status": "x".repeat(20_000), "other": 1});
        let (c, compressed) = compress_state(s, 10_000);
        assert!(compressed);
        assert!(size(&c) <= 10_000, "{}", size(&c));
        assert!(c["status"].as_str().unwrap().starts_with("[… "));
    }

    /// The cases an agent author reported: a long string state, a nested list, a top-level
    /// list of large items.
    #[test]
    fn reported_states_end_within_the_bound() {
        let (c, compressed) = compress_state(json!("s".repeat(20_000)), 10_000);
        assert!(compressed && size(&c) <= 10_000, "{}", size(&c));
        let nested = json!({"data": {"items": (0..5000).map(|i| json!({"i": i, "pad": "p".repeat(20)})).collect::<Vec<_>>()}, "count": 1});
        let (c, _) = compress_state(nested, 10_000);
        assert!(size(&c) <= 10_000, "{}", size(&c));
        let items = c["data"]["items"]
            .as_array()
            .expect("data kept, its list trimmed");
        assert_eq!(items.last().unwrap()["i"], 4999, "the end is kept");
        let list = json!(
            (0..5000)
                .map(|i| "x".repeat(200) + &i.to_string())
                .collect::<Vec<_>>()
        );
        let (c, _) = compress_state(list, 10_000);
        assert!(size(&c) <= 10_000, "{}", size(&c));
        assert!(
            c.as_array()
                .unwrap()
                .last()
                .unwrap()
                .as_str()
                .unwrap()
                .ends_with("4999")
        );
    }

    /// Random nested states of every shape: what comes out is within the bound, keeps the
    /// essential keys, and a state already within it is untouched.
    #[test]
    fn random_states_always_end_within_the_bound() {
        use rand::{Rng, SeedableRng};
        fn arbitrary(rng: &mut rand::rngs::StdRng, depth: u32) -> Value {
            match rng.gen_range(0..if depth > 3 { 4 } else { 6 }) {
                0 => json!(rng.gen_range(-1000..1000)),
                1 => json!(null),
                2 => json!(rng.gen_bool(0.5)),
                3 => {
                    let n =
                        [0, 5, 80, 3000, 25_000][rng.gen_range(0..if depth < 2 { 5 } else { 3 })];
                    json!("é\"\n".repeat(n / 3) + &"a".repeat(n % 3))
                }
                // Long lists only near the top: the state stays thousands of nodes, not
                // millions.
                4 => Value::Array(
                    (0..if depth == 0 {
                        [0, 3, 150, 2000][rng.gen_range(0..4)]
                    } else {
                        [0, 3, 20][rng.gen_range(0..3)]
                    })
                        .map(|_| arbitrary(rng, depth + 1))
                        .collect(),
                ),
                _ => Value::Object(
                    (0..rng.gen_range(0..12))
                        .map(|i| (format!("k{i}"), arbitrary(rng, depth + 1)))
                        .collect(),
                ),
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(20261201);
        for case in 0..150 {
            let mut state = arbitrary(&mut rng, 0);
            if case % 2 == 0 {
                state = json!({"status": arbitrary(&mut rng, 2), "error": arbitrary(&mut rng, 2), "count": case, "rest": state});
            }
            for max in [200, 1_000, 10_000] {
                let before = size(&state);
                let (c, compressed) = compress_state(state.clone(), max);
                assert!(size(&c) <= max, "case {case}: {} > {max}", size(&c));
                assert_eq!(compressed, before > max, "case {case}");
                if before <= max {
                    assert_eq!(c, state);
                }
                if case % 2 == 0 {
                    for key in ESSENTIAL {
                        assert!(c.get(key).is_some(), "case {case}: {key} went");
                    }
                }
            }
        }
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
