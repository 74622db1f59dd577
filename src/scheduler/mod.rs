//! Cron scheduling of agents by one leader, elected through a PostgreSQL advisory lock.
//!
//! Every replica runs [`run`]. It tries `pg_try_advisory_lock` every `elect_interval_s` on a
//! dedicated connection (not from the pool) with `idle_session_timeout` and
//! `idle_in_transaction_session_timeout`, a statement timeout and server-side TCP keepalives, so a hung, stopped or partitioned leader loses the
//! lock on the server side even while its socket stays open. The leader probes that
//! connection every second and steps down at the first error or slow probe.
//!
//! Guarantees:
//! - ticks are enqueued *through the connection that holds the lock*, in one transaction with
//!   the agent's `last_fire_at`: a leader whose session the server ended cannot enqueue
//!   anything, it fails and steps down;
//! - each tick is a task with the unique key `(agent_id, fire_at)` and `ON CONFLICT DO
//!   NOTHING`, so even two leaders at once produce one run;
//! - ticks are computed from the schedule itself (`next_after(last tick)`), never from a
//!   stream: missed ticks younger than `misfire_grace_s` are coalesced into one run, older
//!   ones skipped and logged;
//! - agent changes take effect at once (`NOTIFY harness_agents`), with a periodic re-read.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::agents::{AGENTS_CHANNEL, Agent, Agents};
use crate::cron::CronSchedule;
use crate::queue::Queue;

/// First half of the advisory lock key ("HARS"); the second is the namespace's hash.
const LOCK_CLASS: i32 = 0x4841_5253;
/// How often the leader checks that it still is.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe slower than this means the leader cannot count on its connection: step down.
const PROBE_LIMIT: Duration = Duration::from_secs(1);
/// At most this many missed ticks are walked one by one.
const MAX_WALK: usize = 100_000;

/// What to do about an agent's ticks due by now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The tick to run (the latest one within the grace period), if any.
    pub fire: Option<DateTime<Utc>>,
    /// The latest tick handled: the agent's new `last_fire_at`.
    pub last: DateTime<Utc>,
    /// Ticks older than the grace period, skipped.
    pub skipped: usize,
    /// Ticks within the grace period folded into `fire`.
    pub coalesced: usize,
}

/// The ticks of `schedule` after `base` and up to `now`, planned: missed ticks within
/// `grace` of `now` become one run at the latest of them; older ones are skipped. `None`
/// when nothing is due.
pub fn plan(
    schedule: &CronSchedule,
    base: DateTime<Utc>,
    now: DateTime<Utc>,
    grace: Duration,
) -> Option<Plan> {
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    let cutoff = now - grace;
    let mut t = schedule.next_after(base)?;
    if t > now {
        return None;
    }
    let (mut skipped, mut in_grace, mut last) = (0usize, 0usize, t);
    let mut walked = 0;
    while t <= now {
        if t < cutoff {
            skipped += 1;
        } else {
            in_grace += 1;
        }
        last = t;
        walked += 1;
        if walked >= MAX_WALK && t < cutoff {
            // Long outage of a frequent schedule: jump to the grace window.
            t = match schedule.next_after(cutoff - chrono::Duration::seconds(1)) {
                Some(n) => n,
                None => break,
            };
            continue;
        }
        t = match schedule.next_after(t) {
            Some(n) => n,
            None => break,
        };
    }
    Some(Plan {
        fire: (in_grace > 0).then_some(last),
        last,
        skipped,
        coalesced: in_grace.saturating_sub(1),
    })
}

/// Settings of the scheduler of one replica.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    pub replica: String,
    pub namespace: String,
    pub elect_interval: Duration,
    pub misfire_grace: Duration,
    pub idle_session_timeout: Duration,
    pub reconcile_interval: Duration,
}

impl SchedulerOptions {
    pub fn from_config(cfg: &crate::config::Config, replica: &str) -> SchedulerOptions {
        SchedulerOptions {
            replica: replica.to_string(),
            namespace: cfg.scheduler.namespace.clone(),
            elect_interval: Duration::from_secs(cfg.scheduler.elect_interval_s),
            misfire_grace: Duration::from_secs(cfg.scheduler.misfire_grace_s),
            idle_session_timeout: Duration::from_secs(cfg.scheduler.idle_session_timeout_s),
            reconcile_interval: Duration::from_secs(cfg.scheduler.reconcile_interval_s),
        }
    }
}

/// Tries to become the leader: a dedicated connection holding the advisory lock, opened like
/// the connections of `sessions` (a session of its own, whatever pooler `pool` goes through).
async fn try_lead(
    sessions: &PgPool,
    opts: &SchedulerOptions,
) -> Result<Option<PgConnection>, sqlx::Error> {
    let mut conn = (*sessions.connect_options())
        .clone()
        .application_name(&format!("harness-scheduler {}", opts.replica))
        .connect()
        .await?;
    // Every state of the session is bounded, so a leader stopped or cut off anywhere loses
    // the lock on the server side: idle (idle_session_timeout), inside a transaction
    // (idle_in_transaction_session_timeout: idle_session_timeout does not apply there), and
    // running a statement (statement_timeout); keepalives cover a vanished peer.
    sqlx::query(
        "SELECT set_config('idle_session_timeout', $1, false), \
                set_config('idle_in_transaction_session_timeout', $1, false), \
                set_config('statement_timeout', '2s', false), \
                set_config('tcp_keepalives_idle', '5', false), \
                set_config('tcp_keepalives_interval', '2', false), \
                set_config('tcp_keepalives_count', '3', false)",
    )
    .bind(format!("{}ms", opts.idle_session_timeout.as_millis()))
    .execute(&mut conn)
    .await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(LOCK_CLASS)
        .bind(&opts.namespace)
        .fetch_one(&mut conn)
        .await?;
    if got {
        Ok(Some(conn))
    } else {
        let _ = conn.close().await;
        Ok(None)
    }
}

/// Takes the leader lock of `namespace` on `conn`, held for as long as that session lives,
/// so that no replica on the database leads (fires cron ticks) meanwhile: what `harness
/// bench --console` does, so that no scheduled agent run starts in the middle of what it
/// measures. Returns whether it got the lock.
pub async fn hold_leadership(
    conn: &mut PgConnection,
    namespace: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(LOCK_CLASS)
        .bind(namespace)
        .fetch_one(conn)
        .await
}

/// Runs the replica's scheduler until `stop`: campaigns, and leads when elected. Statements
/// go through `pool`; the leader lock and the leader's `LISTEN` through `sessions`.
pub async fn run(
    pool: PgPool,
    sessions: PgPool,
    agents: Agents,
    queue: Queue,
    opts: SchedulerOptions,
    stop: CancellationToken,
) {
    loop {
        match try_lead(&sessions, &opts).await {
            Ok(Some(conn)) => {
                tracing::info!(replica = %opts.replica, namespace = %opts.namespace, "became the scheduler leader");
                crate::telemetry::metrics().leader.record(1, &[]);
                if let Err(e) = crate::fleet::replicas::set_leader(&pool, &opts.replica, true).await
                {
                    tracing::warn!(error = %e, "could not record leadership in the replicas table");
                }
                let why = {
                    use tracing::Instrument;
                    let span = tracing::info_span!("scheduler.lead", replica = %opts.replica);
                    lead(conn, &sessions, &agents, &queue, &opts, &stop)
                        .instrument(span)
                        .await
                };
                tracing::info!(replica = %opts.replica, reason = %why, "stepped down as scheduler leader");
                crate::telemetry::metrics().leader.record(0, &[]);
                let _ = crate::fleet::replicas::set_leader(&pool, &opts.replica, false).await;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "leader election attempt failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(opts.elect_interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Per-agent state of the leader.
struct Tracked {
    agent: Agent,
    schedule: CronSchedule,
    /// The last tick handled.
    base: DateTime<Utc>,
}

impl Tracked {
    fn next(&self) -> Option<DateTime<Utc>> {
        self.schedule.next_after(self.base)
    }
}

async fn load(
    agents: &Agents,
    tracked: &mut HashMap<i64, Tracked>,
) -> Result<(), crate::agents::Error> {
    let mut fresh = HashMap::new();
    for agent in agents.scheduled().await? {
        let Some(schedule) = agent.settings.schedule() else {
            continue;
        };
        let db_base = agent.schedule_base();
        // Keep our own later tick if the database has not caught up with it yet.
        let base = match tracked.get(&agent.id) {
            Some(t) if t.agent.updated_at == agent.updated_at => t.base.max(db_base),
            _ => db_base,
        };
        fresh.insert(
            agent.id,
            Tracked {
                agent,
                schedule,
                base,
            },
        );
    }
    *tracked = fresh;
    Ok(())
}

/// Leads until something goes wrong or `stop`; returns why it stopped.
async fn lead(
    mut conn: PgConnection,
    sessions: &PgPool,
    agents: &Agents,
    queue: &Queue,
    opts: &SchedulerOptions,
    stop: &CancellationToken,
) -> String {
    let mut listener = match sqlx::postgres::PgListener::connect_with(sessions).await {
        Ok(mut l) => match l.listen(AGENTS_CHANNEL).await {
            Ok(()) => Some(l),
            Err(_) => None,
        },
        Err(_) => None,
    };
    let mut tracked = HashMap::new();
    if let Err(e) = load(agents, &mut tracked).await {
        return format!("could not read agents: {e}");
    }
    let mut last_load = tokio::time::Instant::now();
    loop {
        let now = Utc::now();
        let next_due = tracked.values().filter_map(Tracked::next).min();
        let until_due = next_due
            .map(|t| (t - now).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(PROBE_INTERVAL)
            .min(PROBE_INTERVAL);
        let mut changed = false;
        tokio::select! {
            _ = tokio::time::sleep(until_due) => {}
            n = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            } => {
                match n {
                    Ok(()) => changed = true,
                    Err(_) => listener = None,
                }
            }
            _ = stop.cancelled() => return "shutting down".into(),
        }
        // Still the leader? Any error or a slow answer: step down.
        match tokio::time::timeout(PROBE_LIMIT, sqlx::query("SELECT 1").execute(&mut conn)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("the leader connection failed: {e}"),
            Err(_) => return format!("the leader probe took more than {PROBE_LIMIT:?}"),
        }
        if changed || last_load.elapsed() >= opts.reconcile_interval {
            if let Err(e) = load(agents, &mut tracked).await {
                tracing::warn!(error = %e, "could not re-read agents");
            }
            last_load = tokio::time::Instant::now();
        }
        let now = Utc::now();
        for t in tracked.values_mut() {
            let Some(p) = plan(&t.schedule, t.base, now, opts.misfire_grace) else {
                continue;
            };
            if p.skipped > 0 {
                tracing::warn!(
                    agent = %t.agent.name,
                    skipped = p.skipped,
                    grace_s = opts.misfire_grace.as_secs(),
                    "skipped ticks older than the misfire grace period"
                );
            }
            if let Err(e) = fire(&mut conn, agents, queue, t, &p, &opts.replica).await {
                return format!("could not enqueue a tick: {e}");
            }
            t.base = p.last;
        }
    }
}

/// Enqueues the planned tick (if any) and records the last handled tick, in one transaction
/// on the leader's connection.
async fn fire(
    conn: &mut PgConnection,
    agents: &Agents,
    queue: &Queue,
    t: &Tracked,
    p: &Plan,
    replica: &str,
) -> Result<(), String> {
    let mut tx = conn.begin().await.map_err(|e| e.to_string())?;
    // First, and under the agent's row lock: a pause or removal since the last read wins.
    if !Agents::mark_fired_in(&mut tx, t.agent.id, p.last)
        .await
        .map_err(|e| e.to_string())?
    {
        tracing::info!(agent = %t.agent.name, "not firing: the agent was paused or removed");
        return tx.rollback().await.map_err(|e| e.to_string());
    }
    if let Some(at) = p.fire {
        let mut task = agents
            .new_run(&t.agent, serde_json::Value::Null)
            .fire_at(at);
        task.payload["scheduled_by"] = json!(replica);
        task.payload["fire_at"] = json!(at);
        // On the leader's own connection, not the queue's pool.
        let e = queue
            .enqueue_in(&mut tx, task)
            .await
            .map_err(|e| e.to_string())?;
        if e.deduplicated {
            tracing::info!(agent = %t.agent.name, fire_at = %at, "tick already enqueued (another leader)");
        } else {
            tracing::info!(agent = %t.agent.name, fire_at = %at, task.id = e.id, coalesced = p.coalesced, "enqueued scheduled run");
        }
    }
    tx.commit().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn nothing_due_before_the_next_tick() {
        let s = CronSchedule::parse("0 * * * *", None).unwrap();
        assert_eq!(
            plan(
                &s,
                at("2026-01-01T10:00:00Z"),
                at("2026-01-01T10:59:59Z"),
                Duration::from_secs(60)
            ),
            None
        );
    }

    #[test]
    fn one_due_tick_fires() {
        let s = CronSchedule::parse("*/1 * * * * *", None).unwrap();
        let p = plan(
            &s,
            at("2026-01-01T10:00:00Z"),
            at("2026-01-01T10:00:01.2Z"),
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(
            p,
            Plan {
                fire: Some(at("2026-01-01T10:00:01Z")),
                last: at("2026-01-01T10:00:01Z"),
                skipped: 0,
                coalesced: 0
            }
        );
    }

    #[test]
    fn missed_ticks_within_grace_coalesce_older_ones_are_skipped() {
        let s = CronSchedule::parse("*/10 * * * * *", None).unwrap();
        // 10:00:00 .. 10:02:00 missed; grace 60 s at 10:02:05.
        let p = plan(
            &s,
            at("2026-01-01T09:59:55Z"),
            at("2026-01-01T10:02:05Z"),
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(p.fire, Some(at("2026-01-01T10:02:00Z")));
        assert_eq!(p.last, at("2026-01-01T10:02:00Z"));
        assert_eq!(
            p.skipped, 7,
            "10:00:00 .. 10:01:00 are older than the grace"
        );
        assert_eq!(
            p.coalesced, 5,
            "10:01:10 .. 10:01:50 fold into the 10:02:00 run"
        );
    }

    #[test]
    fn all_missed_ticks_too_old_are_only_recorded() {
        let s = CronSchedule::parse("0 * * * *", None).unwrap();
        let p = plan(
            &s,
            at("2026-01-01T00:30:00Z"),
            at("2026-01-01T05:30:00Z"),
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(
            (p.fire, p.last, p.skipped),
            (None, at("2026-01-01T05:00:00Z"), 5)
        );
    }

    #[test]
    fn a_week_of_missed_seconds_is_cheap() {
        let s = CronSchedule::parse("* * * * * *", None).unwrap();
        let started = std::time::Instant::now();
        let p = plan(
            &s,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-08T00:00:00Z"),
            Duration::from_secs(60),
        )
        .unwrap();
        // Computed, not walked tick by tick (604,800 of them): milliseconds even when busy.
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(p.fire, Some(at("2026-01-08T00:00:00Z")));
        assert_eq!(p.coalesced, 60);
    }
}
