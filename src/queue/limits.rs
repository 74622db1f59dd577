//! Fleet-wide limits: at most N tasks running at once, and at most R starts per interval
//! (a token bucket), for the tasks of a queue, a kind, an agent, or a concurrency key (one
//! key, or `*`: each key on its own). Enforced in the claim transaction (see [`claim_limited`]):
//! a claim of limited tasks locks every limit row, counts what runs fleet-wide, refills and
//! spends the buckets, and takes only what every limit that applies allows. Tasks over a limit
//! stay pending; the claim says when the next token returns, so a replica waits for it
//! instead of polling.
//!
//! Claims of tasks no limit applies to never touch these tables: they check, in their own
//! statement, that the limits have not changed since the replica read them
//! (`limits_version`), and leave limited tasks to the limited claim.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::{Claimed, Error, validate_queue_name};

/// What a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Queue,
    Kind,
    Agent,
    Key,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Queue, Scope::Kind, Scope::Agent, Scope::Key];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Queue => "queue",
            Scope::Kind => "kind",
            Scope::Agent => "agent",
            Scope::Key => "key",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// The target of a key limit that applies to each key on its own.
pub const EACH_KEY: &str = "*";

/// How long a replica whose last limited claim found no task any limit applies to waits
/// before it looks again: how much later than other tasks a newly due limited task may be
/// claimed.
pub const IDLE_RECHECK: Duration = Duration::from_millis(250);

/// The largest concurrency limit.
pub const MAX_CONCURRENCY: i32 = 1_000_000;

/// The most starts a rate may allow per interval, and the longest interval.
pub const MAX_RATE: i32 = 1_000_000;
pub const MAX_PER: Duration = Duration::from_secs(86_400);

/// One limit. `target`: a queue's name, a kind, an agent's id, a key or [`EACH_KEY`].
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Limit {
    pub scope: Scope,
    pub target: String,
    /// At most this many of its tasks running at once, fleet-wide.
    pub concurrency: Option<i32>,
    /// At most `rate` starts per `per_ms` milliseconds, fleet-wide.
    pub rate: Option<i32>,
    pub per_ms: Option<i64>,
}

impl Limit {
    /// Checks the limit; the error names the field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field, reason: &str| Error::Invalid {
            field,
            reason: reason.to_string(),
        };
        match self.scope {
            Scope::Queue => {
                validate_queue_name(&self.target).map_err(|r| bad("target", &r))?;
            }
            Scope::Agent => {
                // Spelled as the id prints, so that it matches the tasks' agent_id as text.
                if self
                    .target
                    .parse::<i64>()
                    .map_or(true, |id| id <= 0 || id.to_string() != self.target)
                {
                    return Err(bad("target", "an agent limit names the agent's id"));
                }
            }
            Scope::Kind | Scope::Key => {
                if self.target.is_empty()
                    || self.target.chars().count() > super::MAX_KEY_LEN
                    || crate::db::text::has_nul(&self.target)
                {
                    return Err(bad(
                        "target",
                        &format!(
                            "must be 1 to {} characters, without NUL (a key limit: a key, or * \
                             for each key on its own)",
                            super::MAX_KEY_LEN
                        ),
                    ));
                }
            }
        }
        if self.concurrency.is_none() && self.rate.is_none() {
            return Err(bad(
                "concurrency",
                "give a concurrency, a rate, or both (to remove a limit, delete it)",
            ));
        }
        if self
            .concurrency
            .is_some_and(|c| !(1..=MAX_CONCURRENCY).contains(&c))
        {
            return Err(bad(
                "concurrency",
                &format!("must be 1 to {MAX_CONCURRENCY}"),
            ));
        }
        match (self.rate, self.per_ms) {
            (None, None) => {}
            (Some(r), Some(p)) => {
                if !(1..=MAX_RATE).contains(&r) {
                    return Err(bad("rate", &format!("must be 1 to {MAX_RATE} starts")));
                }
                if !(1..=MAX_PER.as_millis() as i64).contains(&p) {
                    return Err(bad("rate", "its interval must be 1 ms to 24 h"));
                }
            }
            _ => return Err(bad("rate", "a rate needs its interval, e.g. 60/min")),
        }
        Ok(())
    }

    /// Starts the bucket holds at most: 100 ms worth of the rate, at least one.
    fn burst(&self) -> f64 {
        match (self.rate, self.per_ms) {
            (Some(r), Some(p)) => (r as f64 * 100.0 / p as f64).floor().max(1.0),
            _ => f64::INFINITY,
        }
    }

    /// Tokens per second.
    fn refill(&self) -> f64 {
        match (self.rate, self.per_ms) {
            (Some(r), Some(p)) => r as f64 * 1000.0 / p as f64,
            _ => 0.0,
        }
    }

    /// Whether it applies to a task, and under which bucket key.
    fn key_for(&self, t: &Candidate) -> Option<String> {
        let hit = match self.scope {
            Scope::Queue => t.queue == self.target,
            Scope::Kind => t.kind == self.target,
            Scope::Agent => t.agent_id.is_some_and(|a| a.to_string() == self.target),
            Scope::Key => t
                .concurrency_key
                .as_deref()
                .is_some_and(|k| self.target == EACH_KEY || k == self.target),
        };
        hit.then(|| match (self.scope, self.target.as_str()) {
            (Scope::Key, EACH_KEY) => t.concurrency_key.clone().unwrap_or_default(),
            _ => String::new(),
        })
    }
}

/// `queue:heavy` → (Queue, "heavy"): a limit's target as the CLI and `harness bench` take it
/// (an agent by its name, which the caller turns into its id).
pub fn parse_target(s: &str) -> Result<(Scope, &str), String> {
    let (scope, target) = s.split_once(':').ok_or_else(|| {
        format!(
            "{s:?}: a target is queue:NAME, kind:KIND, agent:NAME or key:KEY (key:* for each key)"
        )
    })?;
    let scope = Scope::parse(scope)
        .ok_or_else(|| format!("{scope:?} is not a scope; use queue, kind, agent or key"))?;
    Ok((scope, target))
}

/// `30s`-style interval for a rate: `60/min` is 60 per 60,000 ms.
pub fn parse_rate(s: &str) -> Result<(i32, i64), String> {
    let (n, per) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a rate; use e.g. 20/s, 60/min, 1000/h, 5/30s"))?;
    let n: i32 = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {n:?} is not a whole number of starts"))?;
    let per = per.trim();
    let ms = match per {
        "s" | "sec" | "second" => 1_000,
        "min" | "m" | "minute" => 60_000,
        "h" | "hour" => 3_600_000,
        "d" | "day" => 86_400_000,
        other => humantime::parse_duration(other)
            .map_err(|_| format!("{s:?}: {other:?} is not an interval; use s, min, h or e.g. 30s"))?
            .as_millis() as i64,
    };
    Ok((n, ms))
}

/// A limit with what it applies to now, as `harness limits` and the API show it.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct LimitInfo {
    #[serde(flatten)]
    pub limit: Limit,
    /// Its tasks running fleet-wide (claimed, not yet ended).
    pub running: i64,
    /// Its tasks due now that wait because the limit is full (no slot or no token left);
    /// 0 while it is not.
    pub waiting: i64,
    pub updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct Row {
    scope: String,
    target: String,
    concurrency: Option<i32>,
    rate: Option<i32>,
    per_ms: Option<i64>,
    updated_at: DateTime<Utc>,
}

impl Row {
    fn limit(&self) -> Option<Limit> {
        Some(Limit {
            scope: Scope::parse(&self.scope)?,
            target: self.target.clone(),
            concurrency: self.concurrency,
            rate: self.rate,
            per_ms: self.per_ms,
        })
    }
}

const BUMP: &str = "UPDATE limits_version SET version = version + 1";

/// Every limit, in one order (the order claims lock them in).
macro_rules! select_limits {
    () => {
        "SELECT scope, target, concurrency, rate, per_ms, updated_at FROM limits \
         ORDER BY scope, target"
    };
}

/// Taken first by a change of the limits: it waits for the claims in flight (they hold it
/// shared), and claims that begin meanwhile wait for the change to commit.
const LOCK: &str = concat!("SELECT pg_advisory_xact_lock(", limits_lock!(), ")");

/// Sets (adds or replaces) a limit. Binds every claim that begins after it commits.
pub async fn set(pool: &PgPool, limit: &Limit) -> Result<(), Error> {
    limit.validate()?;
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK).execute(&mut *tx).await?;
    sqlx::query(
        "INSERT INTO limits (scope, target, concurrency, rate, per_ms) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (scope, target) DO UPDATE SET concurrency = $3, rate = $4, per_ms = $5, \
         updated_at = now()",
    )
    .bind(limit.scope.as_str())
    .bind(&limit.target)
    .bind(limit.concurrency)
    .bind(limit.rate)
    .bind(limit.per_ms)
    .execute(&mut *tx)
    .await?;
    // A changed rate starts from a full bucket.
    sqlx::query("DELETE FROM limit_buckets WHERE scope = $1 AND target = $2")
        .bind(limit.scope.as_str())
        .bind(&limit.target)
        .execute(&mut *tx)
        .await?;
    sqlx::query(BUMP).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Removes a limit; its tasks are claimed as others are from then on, and every replica is
/// woken to claim them. Returns whether it existed.
pub async fn remove(pool: &PgPool, scope: Scope, target: &str) -> Result<bool, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK).execute(&mut *tx).await?;
    let n = sqlx::query("DELETE FROM limits WHERE scope = $1 AND target = $2")
        .bind(scope.as_str())
        .bind(target)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query(BUMP).execute(&mut *tx).await?;
    sqlx::query(super::NOTIFY_TASKS).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(n > 0)
}

/// Every limit with its running tasks and the due tasks it holds back now.
pub async fn list(pool: &PgPool) -> Result<Vec<LimitInfo>, Error> {
    let rows: Vec<Row> = sqlx::query_as(select_limits!()).fetch_all(pool).await?;
    let mut conn = pool.acquire().await?;
    let running = running_tasks(&mut conn).await?;
    let (buckets, now) = buckets(&mut conn).await?;
    let mut out = Vec::new();
    for row in rows {
        let Some(limit) = row.limit() else { continue };
        let mine: Vec<&Candidate> = running
            .iter()
            .filter(|t| limit.key_for(t).is_some())
            .collect();
        let count = mine.len() as i64;
        // Full: no slot left (for a `*` key limit: some key has none), or no token now.
        let full_keys: Vec<String> = if let Some(c) = limit.concurrency {
            let mut per_key: HashMap<String, i64> = HashMap::new();
            for t in &mine {
                *per_key
                    .entry(limit.key_for(t).unwrap_or_default())
                    .or_default() += 1;
            }
            per_key
                .into_iter()
                .filter(|(_, n)| *n >= c as i64)
                .map(|(k, _)| k)
                .collect()
        } else {
            Vec::new()
        };
        let dry_keys: Vec<String> = buckets
            .iter()
            .filter(|b| b.scope == limit.scope.as_str() && b.target == limit.target)
            .filter(|b| tokens_now(&limit, b.tokens, b.at, now) < 1.0)
            .map(|b| b.key.clone())
            .collect();
        let held: Vec<String> = full_keys.into_iter().chain(dry_keys).collect();
        let waiting = if held.is_empty() {
            0
        } else {
            waiting_under(pool, &limit, &held).await?
        };
        out.push(LimitInfo {
            limit,
            running: count,
            waiting,
            updated_at: row.updated_at,
        });
    }
    Ok(out)
}

/// Due tasks the limit applies to (under one of `keys`, for a `*` key limit).
async fn waiting_under(pool: &PgPool, limit: &Limit, keys: &[String]) -> Result<i64, Error> {
    let column = match limit.scope {
        Scope::Queue => "queue",
        Scope::Kind => "kind",
        Scope::Agent => "agent_id::text",
        Scope::Key => "concurrency_key",
    };
    let targets: Vec<&str> = if limit.scope == Scope::Key && limit.target == EACH_KEY {
        keys.iter().map(String::as_str).collect()
    } else {
        vec![limit.target.as_str()]
    };
    Ok(sqlx::query_scalar(&format!(
        "SELECT count(*) FROM tasks WHERE status IN ('pending', 'retry_scheduled') \
         AND scheduled_at <= now() AND {column} = ANY($1)"
    ))
    .bind(&targets)
    .fetch_one(pool)
    .await?)
}

/// The limits as one replica last read them, with the version they were read at.
#[derive(Debug, Clone, Default)]
pub struct LimitSet {
    pub version: i64,
    pub limits: Vec<Limit>,
}

impl LimitSet {
    pub async fn load(conn: &mut PgConnection) -> Result<LimitSet, Error> {
        let version: i64 = sqlx::query_scalar("SELECT version FROM limits_version")
            .fetch_one(&mut *conn)
            .await?;
        let rows: Vec<Row> = sqlx::query_as(select_limits!())
            .fetch_all(&mut *conn)
            .await?;
        Ok(LimitSet {
            version,
            limits: rows.iter().filter_map(Row::limit).collect(),
        })
    }

    /// What the plain claim leaves out (see [`exclusions`]).
    pub(super) fn exclusions(&self) -> Exclusions {
        exclusions(&self.limits)
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }
}

/// What a claim that takes no limited task leaves out: whole queues, kinds, agents, keys (or
/// every keyed task, with a `*` key limit).
pub(super) fn exclusions(limits: &[Limit]) -> Exclusions {
    let targets = |scope: Scope| -> Vec<String> {
        limits
            .iter()
            .filter(|l| l.scope == scope)
            .map(|l| l.target.clone())
            .collect()
    };
    Exclusions {
        queues: targets(Scope::Queue),
        kinds: targets(Scope::Kind),
        agents: targets(Scope::Agent)
            .iter()
            .filter_map(|t| t.parse().ok())
            .collect(),
        keys: targets(Scope::Key),
        every_key: limits
            .iter()
            .any(|l| l.scope == Scope::Key && l.target == EACH_KEY),
    }
}

/// Slots taken (or tokens left) per limit, by its index, and bucket key.
type Counts<T> = HashMap<(usize, String), T>;

/// Whether `limit` lets one more task under `key` start now: (a slot is free, a token is
/// left). A bucket not stored is full.
fn allows(
    limit: &Limit,
    key: &(usize, String),
    used: &Counts<i64>,
    tokens: &Counts<f64>,
) -> (bool, bool) {
    let slot = limit
        .concurrency
        .is_none_or(|n| used.get(key).copied().unwrap_or(0) < n as i64);
    let token =
        limit.rate.is_none() || tokens.get(key).copied().unwrap_or_else(|| limit.burst()) >= 1.0;
    (slot, token)
}

/// What [`LimitSet::exclusions`] gives.
#[derive(Debug, Clone, Default)]
pub(super) struct Exclusions {
    pub queues: Vec<String>,
    pub kinds: Vec<String>,
    pub agents: Vec<i64>,
    pub keys: Vec<String>,
    pub every_key: bool,
}

/// A waiting or running task as limits see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(super) struct Candidate {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    pub agent_id: Option<i64>,
    pub concurrency_key: Option<String>,
    #[sqlx(default)]
    pub priority: i32,
    #[sqlx(default)]
    pub scheduled_at: Option<DateTime<Utc>>,
}

async fn running_tasks(conn: &mut PgConnection) -> Result<Vec<Candidate>, Error> {
    // tasks_status_idx: the running tasks of the fleet, a few per slot.
    Ok(sqlx::query_as(
        "SELECT id, queue, kind, agent_id, concurrency_key FROM tasks WHERE status = 'running'",
    )
    .fetch_all(&mut *conn)
    .await?)
}

#[derive(sqlx::FromRow)]
struct Bucket {
    scope: String,
    target: String,
    key: String,
    tokens: f64,
    at: DateTime<Utc>,
}

async fn buckets(conn: &mut PgConnection) -> Result<(Vec<Bucket>, DateTime<Utc>), Error> {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *conn)
        .await?;
    let b = sqlx::query_as("SELECT scope, target, key, tokens, at FROM limit_buckets")
        .fetch_all(&mut *conn)
        .await?;
    Ok((b, now))
}

fn tokens_now(limit: &Limit, tokens: f64, at: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    let elapsed = (now - at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
    (tokens + elapsed.max(0.0) * limit.refill()).min(limit.burst())
}

/// What a limited claim did.
#[derive(Debug, Default)]
pub(super) struct LimitedClaim {
    pub rows: Vec<Claimed>,
    /// Rows per queue it took, and whether limits held some back.
    pub held_back: bool,
    /// When the next token of an empty bucket returns, if one holds tasks back.
    pub next_token_in: Option<Duration>,
    /// The version of the limits it enforced.
    pub version: i64,
}

// Candidates: the due rows of the given queues that a limit may apply to, the rows of limits
// that are full now left out (walked past), locked SKIP LOCKED; put in claim order by the
// caller (a sort here would be planned at the cost `enable_sort = off` gives it, which
// switches on JIT compilation: 200 ms per claim, measured).
const CANDIDATES: &str = "
SELECT c.id, c.queue, c.kind, c.agent_id, c.concurrency_key, c.priority, c.scheduled_at
FROM unnest($1::text[], $2::bigint[]) AS q(name, n)
CROSS JOIN LATERAL (
    SELECT id, queue, kind, agent_id, concurrency_key, priority, scheduled_at FROM tasks
    WHERE queue = q.name AND status IN ('pending', 'retry_scheduled')
      AND scheduled_at <= now() AND kind = ANY($3)
      AND (q.name = ANY($4) OR kind = ANY($5) OR agent_id = ANY($6)
           OR (concurrency_key IS NOT NULL AND ($7 OR concurrency_key = ANY($8))))
      AND NOT (kind = ANY($9) OR COALESCE(agent_id = ANY($10), false)
               OR COALESCE(concurrency_key = ANY($11), false))
    ORDER BY priority DESC, scheduled_at, id
    LIMIT q.n
    FOR UPDATE SKIP LOCKED) c
WHERE NOT EXISTS (SELECT 1 FROM queues p WHERE p.name = q.name AND p.paused)";

// Whether the queues asked for have a due task of a limit that is full now (the candidates
// walked past them): a probe of tasks_queue_claim_idx, made only while a limit is full.
const SKIPPED_DUE: &str = "
SELECT EXISTS (
    SELECT 1 FROM tasks
    WHERE queue = ANY($1) AND status IN ('pending', 'retry_scheduled')
      AND scheduled_at <= now() AND kind = ANY($2)
      AND (queue = ANY($3) OR kind = ANY($4) OR COALESCE(agent_id = ANY($5), false)
           OR COALESCE(concurrency_key = ANY($6), false)))";

const TAKE: &str = "
UPDATE tasks t
SET status = 'running', locked_by = $1, attempt = t.attempt + 1, started_at = now()
WHERE t.id = ANY($2)
RETURNING t.id, t.kind, t.queue, t.payload, t.priority, t.attempt, t.retry_count,
          t.max_retries, t.timeout_ms, t.agent_id, t.traceparent, t.scheduled_at, t.started_at";

/// Claims, for `replica`, up to `want` rows of each queue among the tasks `set`'s limits apply
/// to, as many as every limit that applies allows. One transaction; it locks every limit row
/// first (in one order), so limited claims take turns across the fleet.
pub(super) async fn claim_limited(
    pool: &PgPool,
    replica: &str,
    want: &[(&str, u32)],
    kinds: &[String],
) -> Result<LimitedClaim, Error> {
    let mut tx = pool.begin().await?;
    super::attempt::pin_plan(&mut tx, super::attempt::CLAIM_PLAN).await?;
    // The limits as they are now, locked: they may have changed since `set` was read.
    let rows: Vec<Row> = sqlx::query_as(concat!(select_limits!(), " FOR UPDATE"))
        .fetch_all(&mut *tx)
        .await?;
    let limits: Vec<Limit> = rows.iter().filter_map(Row::limit).collect();
    let version: i64 = sqlx::query_scalar("SELECT version FROM limits_version")
        .fetch_one(&mut *tx)
        .await?;
    let running = running_tasks(&mut tx).await?;
    let (stored, now) = buckets(&mut tx).await?;
    // Slots taken and tokens left, per limit and bucket key.
    let mut used: Counts<i64> = HashMap::new();
    for t in &running {
        for (i, l) in limits.iter().enumerate() {
            if let Some(k) = l.key_for(t) {
                *used.entry((i, k)).or_default() += 1;
            }
        }
    }
    let mut tokens: Counts<f64> = HashMap::new();
    for b in &stored {
        if let Some(i) = limits
            .iter()
            .position(|l| l.scope.as_str() == b.scope && l.target == b.target)
        {
            tokens.insert(
                (i, b.key.clone()),
                tokens_now(&limits[i], b.tokens, b.at, now),
            );
        }
    }
    // What is full now: walked past by the candidate scan.
    let allows = |i: usize, key: &str, used: &Counts<i64>, tokens: &Counts<f64>| {
        allows(&limits[i], &(i, key.to_string()), used, tokens)
    };
    let (mut skip_kinds, mut skip_agents, mut skip_keys) = (Vec::new(), Vec::new(), Vec::new());
    let mut skip_queues = Vec::new();
    let mut keys_seen: Vec<(usize, String)> = used.keys().cloned().collect();
    keys_seen.extend(tokens.keys().cloned());
    let mut dry: std::collections::HashSet<(usize, String)> = Default::default();
    for (i, k) in keys_seen {
        let (slot, token) = allows(i, &k, &used, &tokens);
        if slot && token {
            continue;
        }
        if !token {
            dry.insert((i, k.clone()));
        }
        let l = &limits[i];
        match l.scope {
            Scope::Queue => skip_queues.push(l.target.clone()),
            Scope::Kind => skip_kinds.push(l.target.clone()),
            Scope::Agent => skip_agents.extend(l.target.parse::<i64>().ok()),
            Scope::Key if l.target == EACH_KEY => skip_keys.push(k),
            Scope::Key => skip_keys.push(l.target.clone()),
        }
    }
    let ex = exclusions(&limits);
    let (queues, ns): (Vec<&str>, Vec<i64>) = want
        .iter()
        .filter(|(q, n)| *n > 0 && !skip_queues.iter().any(|s| s == q))
        .map(|(q, n)| (*q, (*n as i64 * 4 + 32).min(1000)))
        .unzip();
    let mut out = LimitedClaim {
        version,
        ..LimitedClaim::default()
    };
    // Full limits held back tasks of these queues only if they have some due.
    let any_skipped = !skip_queues.is_empty()
        || !skip_kinds.is_empty()
        || !skip_agents.is_empty()
        || !skip_keys.is_empty();
    let all_queues: Vec<&str> = want.iter().map(|(q, _)| *q).collect();
    let skipped_due = any_skipped
        && sqlx::query_scalar::<_, bool>(SKIPPED_DUE)
            .bind(&all_queues)
            .bind(kinds)
            .bind(&skip_queues)
            .bind(&skip_kinds)
            .bind(&skip_agents)
            .bind(&skip_keys)
            .fetch_one(&mut *tx)
            .await?;
    let mut candidates: Vec<Candidate> = if queues.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(CANDIDATES)
            .bind(&queues)
            .bind(&ns)
            .bind(kinds)
            .bind(&ex.queues)
            .bind(&ex.kinds)
            .bind(&ex.agents)
            .bind(ex.every_key)
            .bind(&ex.keys)
            .bind(&skip_kinds)
            .bind(&skip_agents)
            .bind(&skip_keys)
            .fetch_all(&mut *tx)
            .await?
    };
    candidates.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.scheduled_at.cmp(&b.scheduled_at))
            .then(a.id.cmp(&b.id))
    });
    // Take in claim order what every limit that applies allows, up to each queue's want.
    let mut room: HashMap<&str, u32> = want.iter().map(|(q, n)| (*q, *n)).collect();
    let mut take = Vec::new();
    let mut spent: HashMap<(usize, String), f64> = HashMap::new();
    // The limits (and keys) that held back a task of these queues.
    let mut rejected: std::collections::HashSet<(usize, String)> = Default::default();
    for c in &candidates {
        let Some(r) = room.get_mut(c.queue.as_str()) else {
            continue;
        };
        if *r == 0 {
            continue;
        }
        let applies: Vec<(usize, String)> = limits
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.key_for(c).map(|k| (i, k)))
            .collect();
        let blocked: Vec<&(usize, String)> = applies
            .iter()
            .filter(|(i, k)| allows(*i, k, &used, &tokens) != (true, true))
            .collect();
        if !blocked.is_empty() {
            rejected.extend(blocked.into_iter().cloned());
            continue;
        }
        for (i, k) in applies {
            let key = (i, k);
            *used.entry(key.clone()).or_default() += 1;
            if limits[i].rate.is_some() {
                let t = tokens
                    .entry(key.clone())
                    .or_insert_with(|| limits[i].burst());
                *t -= 1.0;
                spent.insert(key, *t);
            }
        }
        *r -= 1;
        take.push(c.id);
    }
    if !take.is_empty() {
        out.rows = sqlx::query_as(TAKE)
            .bind(replica)
            .bind(&take)
            .fetch_all(&mut *tx)
            .await?;
    }
    // The buckets spent from, as of `now`.
    for ((i, key), left) in &spent {
        let l = &limits[*i];
        sqlx::query(
            "INSERT INTO limit_buckets (scope, target, key, tokens, at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (scope, target, key) DO UPDATE SET tokens = $4, at = $5",
        )
        .bind(l.scope.as_str())
        .bind(&l.target)
        .bind(key)
        .bind(left)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    // Buckets full again are as good as none: keep the table to the keys in use.
    sqlx::query(
        "DELETE FROM limit_buckets b USING limits l \
         WHERE b.scope = l.scope AND b.target = l.target \
           AND b.at < $1 - make_interval(secs => l.per_ms / 1000.0)",
    )
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    // When the first bucket that held back a task of these queues has a token again.
    out.held_back = skipped_due || !rejected.is_empty();
    out.next_token_in = tokens
        .iter()
        .filter(|(key, t)| {
            **t < 1.0 && (rejected.contains(*key) || (skipped_due && dry.contains(*key)))
        })
        .map(|((i, _), t)| {
            let refill = limits[*i].refill();
            Duration::from_secs_f64(((1.0 - t) / refill).clamp(0.001, 3600.0))
        })
        .min();
    Ok(out)
}
