//! The cron scheduler across real `harness serve` processes: one leader, failover on
//! `kill -9` and `SIGSTOP`, PostgreSQL restarts, dynamic changes and missed ticks.
//!
//! Timeouts are scaled down for the suite (idle_session_timeout 4 s, election every 1 s);
//! the properties checked are the ones the defaults give at their own scale.

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::TestDb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sqlx::PgPool;

const IDLE_TIMEOUT_S: u64 = 4;
const ELECT_S: u64 = 1;

fn harness(url: &str) -> Command {
    let mut cmd = common::harness_command();
    cmd.env("DATABASE_URL", url)
        .env("HARNESS_TELEMETRY__SAMPLE_INTERVAL_S", "1")
        .env("HARNESS_PERSISTENCE__RESCUE_AFTER_S", "3")
        .env("HARNESS_BULK__POLL_INTERVAL_MS", "100")
        .env("HARNESS_SCHEDULER__ELECT_INTERVAL_S", ELECT_S.to_string())
        .env(
            "HARNESS_SCHEDULER__IDLE_SESSION_TIMEOUT_S",
            IDLE_TIMEOUT_S.to_string(),
        );
    cmd
}

struct Replica(Child);

impl Replica {
    fn start(url: &str) -> Replica {
        Replica(
            harness(url)
                .arg("serve")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
    fn signal(&self, s: Signal) {
        kill(Pid::from_raw(self.pid()), s).unwrap();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGCONT);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tick.py");
    std::fs::write(
        &file,
        "class Agent:\n    def execute(self):\n        return {}\n",
    )
    .unwrap();
    cli(
        url,
        &[
            "agents",
            "add",
            name,
            "--file",
            file.to_str().unwrap(),
            "--schedule",
            schedule,
        ],
    );
}

/// (pid of the leader replica, its id), if one is recorded.
async fn leader(pool: &PgPool) -> Option<(i32, String)> {
    sqlx::query_as("SELECT pid, id FROM replicas WHERE is_leader")
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
}

async fn wait_leader(
    pool: &PgPool,
    not: Option<&str>,
    within: Duration,
) -> ((i32, String), Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(l) = leader(pool).await
            && Some(l.1.as_str()) != not
        {
            return (l, t0.elapsed());
        }
        assert!(t0.elapsed() < within, "no new leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let replicas: Vec<Replica> = (0..3).map(|_| Replica::start(&db.url)).collect();
    add_ticker(&db.url, "ticker", "* * * * * *");
    let ((pid1, id1), _) = wait_leader(&db.pool, None, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    // kill -9 of the leader: a new one within 5 s, and the ticks go on.
    let killed = replicas.iter().find(|r| r.pid() == pid1).unwrap();
    killed.signal(Signal::SIGKILL);
    let killed_at = Utc::now();
    let ((pid2, id2), took) = wait_leader(&db.pool, Some(&id1), Duration::from_secs(5)).await;
    assert_ne!(pid2, pid1);
    eprintln!("failover after kill -9: {took:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let f = fires(&db.pool, "ticker").await;
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
    tokio::time::sleep(Duration::from_secs(3)).await;
    let f = fires(&db.pool, "ticker").await;
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
    assert!(f.len() >= 10, "only {} ticks", f.len());
    drop(replicas);
}

#[tokio::test]
async fn agents_added_paused_and_removed_take_effect_within_a_second() {
    let db = TestDb::new().await;
    let _r = Replica::start(&db.url);
    wait_leader(&db.pool, None, Duration::from_secs(10)).await;

    add_ticker(&db.url, "dyn", "* * * * * *");
    // The change is committed once `agents add` returns: the next second's tick must run.
    let added = Utc::now();
    let t0 = Instant::now();
    loop {
        if let Some(first) = fires(&db.pool, "dyn").await.first() {
            assert!(
                first.0 - added <= chrono::Duration::milliseconds(1100),
                "first tick {} after add",
                first.0 - added
            );
            assert!(
                first.2 - first.0 < chrono::Duration::milliseconds(500),
                "enqueued late"
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "no tick after adding"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    cli(&db.url, &["agents", "pause", "dyn"]);
    let paused = Utc::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late = fires(&db.pool, "dyn")
        .await
        .into_iter()
        .filter(|x| x.2 > paused + chrono::Duration::seconds(1))
        .count();
    assert_eq!(late, 0, "ticks enqueued more than 1 s after pause");

    cli(&db.url, &["agents", "resume", "dyn"]);
    let resumed = Utc::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        fires(&db.pool, "dyn").await.iter().any(|x| x.0 > resumed),
        "ticks after resume"
    );

    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    cli(&db.url, &["agents", "rm", "dyn"]);
    let removed = Utc::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE created_at > $1")
        .bind(removed + chrono::Duration::seconds(1))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        after, 0,
        "tasks created more than 1 s after remove (had {before} before)"
    );
}

#[tokio::test]
async fn missed_ticks_coalesce_into_one_run() {
    let db = TestDb::new().await;
    add_ticker(&db.url, "misfire", "*/2 * * * * *");
    let mut r = Replica::start(&db.url);
    wait_leader(&db.pool, None, Duration::from_secs(10)).await;
    until_fires(&db.pool, "misfire", |f| f.len() >= 2).await;
    r.signal(Signal::SIGTERM);
    r.0.wait().unwrap();
    let stopped = Utc::now();
    // Three ticks (every 2 s) pass with no replica at all.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let restarted = Utc::now();
    let _r2 = Replica::start(&db.url);
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

/// Waits (up to 20 s) until the agent's fires satisfy `done`, and returns them.
async fn until_fires(
    pool: &PgPool,
    agent: &str,
    done: impl Fn(&[(DateTime<Utc>, String, DateTime<Utc>)]) -> bool,
) -> Vec<(DateTime<Utc>, String, DateTime<Utc>)> {
    let t0 = Instant::now();
    loop {
        let f = fires(pool, agent).await;
        if done(&f) {
            return f;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "fires of {agent} never got there: {f:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_leader_stopped_inside_its_firing_transaction_loses_the_lock() {
    let db = TestDb::new().await;
    add_ticker(&db.url, "held", "* * * * * *");
    let a = Replica::start(&db.url);
    let ((pid, a_id), _) = wait_leader(&db.pool, None, Duration::from_secs(10)).await;
    assert_eq!(pid, a.pid());
    // Hold the agent's row: the leader's next firing waits for it inside its transaction.
    let mut hold = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM agents WHERE name = 'held' FOR UPDATE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let app = format!("harness-scheduler {a_id}");
    let t0 = Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind(&app)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if waiting == 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the leader never fired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stopped between BEGIN and COMMIT: once the row is free its UPDATE finishes and the
    // session sits idle in its transaction, holding the advisory lock.
    a.signal(Signal::SIGSTOP);
    hold.commit().await.unwrap();
    let b = Replica::start(&db.url);
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
    let _r = Replica::start(&url);
    let pool = harness::db::connect(&url, 2).await.unwrap();
    wait_leader(&pool, None, Duration::from_secs(10)).await;
    pool.close().await;

    pg.down().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.up().await;
    let back = Utc::now();
    let t0 = Instant::now();
    let pool = harness::db::connect(&url, 2).await.unwrap();
    loop {
        let fresh = fires(&pool, "survivor")
            .await
            .into_iter()
            .any(|x| x.2 > back);
        if fresh && leader(&pool).await.is_some() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no leader firing within 20 s of the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "leader firing again {:?} after PostgreSQL accepted connections",
        t0.elapsed()
    );
    pool.close().await;
    drop(_r);
    pg.down().await;
}
