//! The cron scheduler across real `harness serve` processes: one leader, failover on
//! `kill -9` and `SIGSTOP`, PostgreSQL restarts, dynamic changes and missed ticks.
//!
//! Timeouts are scaled down for the suite (idle_session_timeout 4 s, election every 1 s);
//! the properties checked are the ones the defaults give at their own scale.

mod common;

use std::collections::HashSet;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{Proc, TestDb, eventually};
use nix::sys::signal::Signal;
use sqlx::PgPool;

const IDLE_TIMEOUT_S: u64 = 4;
const ELECT_S: u64 = 1;

fn harness(url: &str) -> Command {
    let mut cmd = common::harness_at(url);
    cmd.env("HARNESS_SCHEDULER__ELECT_INTERVAL_S", ELECT_S.to_string())
        .env(
            "HARNESS_SCHEDULER__IDLE_SESSION_TIMEOUT_S",
            IDLE_TIMEOUT_S.to_string(),
        );
    cmd
}

fn serve(url: &str) -> Proc {
    Proc::spawn(
        harness(url)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

fn cli(url: &str, args: &[&str]) -> Output {
    let o = harness(url).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn add_ticker(url: &str, name: &str, schedule: &str) {
    common::add_ticker(harness(url), name, schedule);
}

/// (pid of the leader replica, its id), if one is recorded. Two rows claiming to lead fail
/// the test: the scheduler's promise is one leader.
async fn leader(pool: &PgPool) -> Option<(i32, String)> {
    let leaders: Vec<(i32, String)> =
        sqlx::query_as("SELECT pid, id FROM replicas WHERE is_leader")
            .fetch_all(pool)
            .await
            .ok()?;
    assert!(
        leaders.len() <= 1,
        "two replicas claim to lead: {leaders:?}"
    );
    leaders.into_iter().next()
}

async fn wait_leader(
    pool: &PgPool,
    not: Option<&str>,
    within: Duration,
) -> ((i32, String), Duration) {
    let t0 = Instant::now();
    let l = eventually("a new leader", within, || async {
        leader(pool).await.filter(|l| Some(l.1.as_str()) != not)
    })
    .await;
    (l, t0.elapsed())
}

/// Fire times enqueued for the agent, in order, with who enqueued each and when.
async fn fires(pool: &PgPool, agent: &str) -> Vec<(DateTime<Utc>, String, DateTime<Utc>)> {
    sqlx::query_as(
        "SELECT t.fire_at, t.payload->>'scheduled_by', t.created_at FROM tasks t \
         JOIN agents a ON a.id = t.agent_id WHERE a.name = $1 AND t.fire_at IS NOT NULL \
         ORDER BY t.fire_at",
    )
    .bind(agent)
    .fetch_all(pool)
    .await
    .unwrap()
}

fn max_gap(f: &[(DateTime<Utc>, String, DateTime<Utc>)]) -> chrono::Duration {
    f.windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or(chrono::Duration::zero())
}

#[tokio::test]
async fn one_leader_fails_over_on_kill_and_stop_and_never_fires_twice() {
    let db = TestDb::new().await;
    let replicas: Vec<Proc> = (0..3).map(|_| serve(&db.url)).collect();
    add_ticker(&db.url, "ticker", "* * * * * *");
    let ((pid1, id1), _) = wait_leader(&db.pool, None, Duration::from_secs(20)).await;
    until_fires(&db.pool, "ticker", |f| f.len() >= 3).await;

    // kill -9 of the leader: a new one within 5 s, and the ticks go on.
    let killed = replicas.iter().find(|r| r.pid() == pid1).unwrap();
    killed.signal(Signal::SIGKILL);
    let killed_at = Utc::now();
    let ((pid2, id2), took) = wait_leader(&db.pool, Some(&id1), Duration::from_secs(5)).await;
    assert_ne!(pid2, pid1);
    eprintln!("failover after kill -9: {took:?}");
    // Ticks by the new leader for two seconds past the kill, so the gap is seen whole.
    let f = until_fires(&db.pool, "ticker", |f| {
        f.iter()
            .any(|x| x.1 == id2 && x.0 > killed_at + chrono::Duration::seconds(2))
    })
    .await;
    let gap = max_gap(&f);
    assert!(
        gap <= chrono::Duration::from_std(took).unwrap() + chrono::Duration::seconds(2),
        "gap {gap} longer than the failover ({took:?}) allows"
    );
    assert!(f.iter().any(|x| x.0 > killed_at), "ticks after the kill");

    // SIGSTOP of the new leader: its session idles out on the server; another takes over.
    let stopped = replicas.iter().find(|r| r.pid() == pid2).unwrap();
    stopped.signal(Signal::SIGSTOP);
    let ((_pid3, id3), took) = wait_leader(
        &db.pool,
        Some(&id2),
        Duration::from_secs(IDLE_TIMEOUT_S + ELECT_S + 4),
    )
    .await;
    eprintln!("failover after SIGSTOP: {took:?}");
    assert_ne!(id3, id2);
    stopped.signal(Signal::SIGCONT);
    let resumed_at = Utc::now();
    // Three ticks of the new leader after the old one woke up: time for it to have fired,
    // had it not stepped down.
    let f = until_fires(&db.pool, "ticker", |f| {
        f.iter().filter(|x| x.1 == id3 && x.2 > resumed_at).count() >= 3
    })
    .await;
    let by_old = f.iter().filter(|x| x.1 == id2 && x.2 > resumed_at).count();
    assert_eq!(by_old, 0, "the old leader enqueued after SIGCONT");
    let (_, current) = leader(&db.pool).await.unwrap();
    assert_eq!(current, id3, "the resumed replica stepped down");

    // Every fire time at most once, one run per second, and no holes beyond failovers.
    let times: HashSet<_> = f.iter().map(|x| x.0).collect();
    assert_eq!(times.len(), f.len(), "a fire time was enqueued twice");
    let dups: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT agent_id, fire_at FROM tasks WHERE fire_at IS NOT NULL \
         GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(dups, 0);
    // A run for every second, but around the two failovers.
    let holes = f
        .windows(2)
        .filter(|w| w[1].0 - w[0].0 > chrono::Duration::seconds(1))
        .count();
    assert!(holes <= 2, "{holes} holes in {f:?}");
    drop(replicas);
}

#[tokio::test]
async fn agents_added_paused_and_removed_take_effect_within_a_second() {
    let db = TestDb::new().await;
    let _r = serve(&db.url);
    wait_leader(&db.pool, None, Duration::from_secs(20)).await;
    // `harness fleet` says since when the leader leads.
    let fleet = String::from_utf8_lossy(&cli(&db.url, &["fleet"]).stdout).to_string();
    let since: DateTime<Utc> =
        sqlx::query_scalar("SELECT leader_since FROM replicas WHERE is_leader")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        fleet.contains(&format!("since {}", since.format("%Y-%m-%d %H:%M:%S"))),
        "{fleet}"
    );
    // A second agent is the clock: "nothing happened for two ticks" is read from its runs.
    add_ticker(&db.url, "clock", "* * * * * *");
    let ticks_after = |t: DateTime<Utc>| {
        let pool = db.pool.clone();
        async move {
            until_fires(&pool, "clock", |f| {
                f.iter().filter(|x| x.2 > t).count() >= 2
            })
            .await;
        }
    };

    add_ticker(&db.url, "dyn", "* * * * * *");
    // The change is committed once `agents add` returns: the next second's tick must run.
    let added = Utc::now();
    let f = until_fires(&db.pool, "dyn", |f| !f.is_empty()).await;
    let first = &f[0];
    assert!(
        first.0 - added <= chrono::Duration::milliseconds(1100),
        "first tick {} after add",
        first.0 - added
    );
    assert!(
        first.2 - first.0 < chrono::Duration::seconds(1),
        "enqueued {} after its tick",
        first.2 - first.0
    );

    cli(&db.url, &["agents", "pause", "dyn"]);
    let paused = Utc::now();
    ticks_after(paused + chrono::Duration::seconds(1)).await;
    let late = fires(&db.pool, "dyn")
        .await
        .into_iter()
        .filter(|x| x.2 > paused + chrono::Duration::seconds(1))
        .count();
    assert_eq!(late, 0, "ticks enqueued more than 1 s after pause");

    cli(&db.url, &["agents", "resume", "dyn"]);
    let resumed = Utc::now();
    until_fires(&db.pool, "dyn", |f| f.iter().any(|x| x.0 > resumed)).await;

    let dyn_id: i64 = sqlx::query_scalar("SELECT id FROM agents WHERE name = 'dyn'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    cli(&db.url, &["agents", "rm", "dyn"]);
    let removed = Utc::now();
    ticks_after(removed + chrono::Duration::seconds(1)).await;
    // A removed agent's tasks keep their payload's agent_id (the column is cleared).
    let after: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE created_at > $1 AND (payload->>'agent_id')::bigint = $2",
    )
    .bind(removed + chrono::Duration::seconds(1))
    .bind(dyn_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(after, 0, "runs of dyn created more than 1 s after remove");
}

#[tokio::test]
async fn missed_ticks_coalesce_into_one_run() {
    let db = TestDb::new().await;
    add_ticker(&db.url, "misfire", "*/2 * * * * *");
    let mut r = serve(&db.url);
    wait_leader(&db.pool, None, Duration::from_secs(20)).await;
    until_fires(&db.pool, "misfire", |f| f.len() >= 2).await;
    r.signal(Signal::SIGTERM);
    assert!(
        r.wait_for_exit(Duration::from_secs(30)).is_some(),
        "the replica did not stop on SIGTERM"
    );
    let stopped = Utc::now();
    // Three ticks (every 2 s) pass with no replica at all: this wait is the scenario.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let restarted = Utc::now();
    let _r2 = serve(&db.url);
    // The new leader's first firing is the catch-up: every tick missed up to that moment
    // folds into that one run (the latest of them), whenever the election happens.
    let f = until_fires(&db.pool, "misfire", |f| f.iter().any(|x| x.2 > restarted)).await;
    let catch_up = f
        .iter()
        .filter(|x| x.2 > restarted)
        .min_by_key(|x| x.2)
        .unwrap();
    let missed: Vec<_> = f
        .iter()
        .filter(|x| x.0 > stopped && x.0 <= catch_up.0)
        .collect();
    assert_eq!(
        missed.len(),
        1,
        "exactly one coalesced run for the missed ticks: {missed:?}"
    );
    assert!(
        catch_up.0 >= restarted - chrono::Duration::seconds(2),
        "the run is the latest missed tick: {catch_up:?}"
    );
    drop(r);
}

/// Waits (up to 60 s) until the agent's fires satisfy `done`, and returns them.
async fn until_fires(
    pool: &PgPool,
    agent: &str,
    done: impl Fn(&[(DateTime<Utc>, String, DateTime<Utc>)]) -> bool,
) -> Vec<(DateTime<Utc>, String, DateTime<Utc>)> {
    let what = format!("the fires of {agent} the test waits for");
    eventually(&what, Duration::from_secs(60), || async {
        let f = fires(pool, agent).await;
        done(&f).then_some(f)
    })
    .await
}

#[tokio::test]
async fn a_leader_stopped_inside_its_firing_transaction_loses_the_lock() {
    let db = TestDb::new().await;
    add_ticker(&db.url, "held", "* * * * * *");
    let a = serve(&db.url);
    let ((pid, a_id), _) = wait_leader(&db.pool, None, Duration::from_secs(20)).await;
    assert_eq!(pid, a.pid());
    // Hold the agent's row: the leader's next firing waits for it inside its transaction.
    let mut hold = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM agents WHERE name = 'held' FOR UPDATE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let app = format!("harness-scheduler {a_id}");
    eventually(
        "the leader waiting for the row",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock'",
            )
            .bind(&app)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (waiting == 1).then_some(())
        },
    )
    .await;
    // Stopped between BEGIN and COMMIT: once the row is free its UPDATE finishes and the
    // session sits idle in its transaction, holding the advisory lock.
    a.signal(Signal::SIGSTOP);
    hold.commit().await.unwrap();
    let b = serve(&db.url);
    let ((pid, b_id), took) = wait_leader(
        &db.pool,
        Some(&a_id),
        Duration::from_secs(IDLE_TIMEOUT_S + ELECT_S + 6),
    )
    .await;
    assert_eq!(pid, b.pid());
    eprintln!("failover after a SIGSTOP inside the firing transaction: {took:?}");
    until_fires(&db.pool, "held", |f| f.iter().any(|x| x.1 == b_id)).await;
    drop(a);
}

#[tokio::test]
async fn a_leader_is_back_soon_after_postgres_restarts() {
    let mut pg = common::RestartableServer::start("restart").await;
    let url = pg.url("restart");
    add_ticker(&url, "survivor", "* * * * * *");
    let _r = serve(&url);
    let pool = harness::db::connect(&url, 2).await.unwrap();
    wait_leader(&pool, None, Duration::from_secs(20)).await;
    pool.close().await;

    pg.down().await;
    // Down for two seconds: this wait is the outage.
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.up().await;
    let back = Utc::now();
    let t0 = Instant::now();
    let pool = harness::db::connect(&url, 2).await.unwrap();
    eventually(
        "a leader firing after the restart",
        Duration::from_secs(30),
        || async {
            let fresh = fires(&pool, "survivor")
                .await
                .into_iter()
                .any(|x| x.2 > back);
            (fresh && leader(&pool).await.is_some()).then_some(())
        },
    )
    .await;
    eprintln!(
        "leader firing again {:?} after PostgreSQL accepted connections",
        t0.elapsed()
    );
    pool.close().await;
    drop(_r);
    pg.down().await;
}
