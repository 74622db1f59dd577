//! Fleet-wide limits, enforced in the claim: a concurrency limit on an agent across three
//! replicas, a rate limit on a kind across two `harness serve` processes (and their CPU while
//! they wait for tokens), a concurrency limit per key that one key's backlog cannot use to
//! starve the others, and limits set, listed and removed through the CLI and the API.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Concurrency, TestDb, count, enqueue_ids, eventually, serve, stop, wait_all_final};
use harness::Harness;
use harness::queue::limits::{self, Limit, Scope};
use harness::queue::{NewTask, Queue, Status};
use serde_json::{Value, json};

fn limit(scope: Scope, target: &str, concurrency: Option<i32>, rate: Option<(i32, i64)>) -> Limit {
    Limit {
        scope,
        target: target.to_string(),
        concurrency,
        rate: rate.map(|r| r.0),
        per_ms: rate.map(|r| r.1),
    }
}

/// Samples `sql` (a count) every few milliseconds until `done` is set; returns the largest.
fn sample_max(
    db: &TestDb,
    sql: &'static str,
    done: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<i64> {
    let pool = db.pool.clone();
    tokio::spawn(async move {
        let mut max = 0;
        while !done.load(Ordering::SeqCst) {
            let n: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
            max = max.max(n);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        max
    })
}

#[tokio::test]
async fn a_concurrency_limit_on_an_agent_holds_across_three_replicas_and_other_work_flows() {
    let db = TestDb::new().await;
    let agent: i64 = sqlx::query_scalar(
        "INSERT INTO agents (name, runtime, command) VALUES ('llm', 'command', '{true}') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    limits::set(
        &db.pool,
        &limit(Scope::Agent, &agent.to_string(), Some(3), None),
    )
    .await
    .unwrap();
    let (limited, other) = (Concurrency::default(), Concurrency::default());
    let mut replicas = Vec::new();
    let mut q = None;
    for i in 0..3 {
        let h = Harness::builder()
            .config(db.fast_config(&[("HARNESS_BULK__MAX_CONCURRENT", "8")]))
            .pool(db.pool.clone())
            .replica_id(format!("r{i}"))
            .handler_with("call_llm", limited.handler(150))
            .handler_with("other", other.handler(10))
            .build()
            .await
            .unwrap();
        q.get_or_insert_with(|| h.queue().clone());
        replicas.push(h);
    }
    let q = q.unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_max(
        &db,
        "SELECT count(*) FROM tasks WHERE kind = 'call_llm' AND status = 'running'",
        done.clone(),
    );
    let llm: Vec<i64> = enqueue_ids(
        &q,
        (0..24)
            .map(|_| NewTask::new("call_llm", json!({})).agent_id(agent))
            .collect(),
    )
    .await;
    let replicas: Vec<_> = replicas.into_iter().map(serve).collect();
    // Other work enqueued behind the limited backlog runs on the free slots meanwhile.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let others: Vec<i64> = enqueue_ids(
        &q,
        (0..300).map(|_| NewTask::new("other", json!({}))).collect(),
    )
    .await;
    wait_all_final(&db.pool, &others, Duration::from_secs(30)).await;
    let llm_done = count(
        &db.pool,
        "SELECT count(*) FROM tasks WHERE kind = 'call_llm' AND status = 'completed'",
    )
    .await;
    assert!(
        llm_done < 24,
        "the other work waited for the limited backlog"
    );
    for id in &llm {
        let t = common::wait_final(&db.pool, *id, Duration::from_secs(60)).await;
        assert_eq!(t.status, Status::Completed);
    }
    done.store(true, Ordering::SeqCst);
    let max_running = sampler.await.unwrap();
    stop(replicas).await;
    assert!(max_running <= 3, "{max_running} running at once");
    assert_eq!(limited.peak(), 3, "the limit was reached, never passed");
    assert!(other.peak() > 3, "other work used the free slots");
    // The listing saw it whole: nothing runs or waits now.
    let listed = limits::list(&db.pool).await.unwrap();
    assert_eq!(listed[0].running, 0);
    assert_eq!(listed[0].waiting, 0);
}

#[tokio::test]
async fn one_keys_backlog_does_not_starve_the_other_keys_under_a_limit_per_key() {
    let db = TestDb::new().await;
    limits::set(
        &db.pool,
        &limit(Scope::Key, limits::EACH_KEY, Some(2), None),
    )
    .await
    .unwrap();
    let work = Concurrency::default();
    let h = Harness::builder()
        .config(db.fast_config(&[("HARNESS_BULK__MAX_CONCURRENT", "8")]))
        .pool(db.pool.clone())
        .handler_with("work", work.handler(100))
        .build()
        .await
        .unwrap();
    let q = h.queue().clone();
    let task = |key: &str| NewTask::new("work", json!({})).concurrency_key(key);
    // One customer's burst first, then two others, and tasks without a key.
    let mut batch: Vec<NewTask> = (0..60).map(|_| task("big")).collect();
    batch.extend((0..4).map(|_| task("small-1")));
    batch.extend((0..4).map(|_| task("small-2")));
    batch.extend((0..4).map(|_| NewTask::new("work", json!({}))));
    let ids: Vec<i64> = enqueue_ids(&q, batch).await;
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_max(
        &db,
        "SELECT COALESCE(max(n), 0) FROM (SELECT count(*) AS n FROM tasks \
         WHERE status = 'running' AND concurrency_key IS NOT NULL GROUP BY concurrency_key) x",
        done.clone(),
    );
    let replicas = vec![serve(h)];
    wait_all_final(&db.pool, &ids[60..], Duration::from_secs(30)).await;
    let big_done = count(
        &db.pool,
        "SELECT count(*) FROM tasks WHERE concurrency_key = 'big' AND status = 'completed'",
    )
    .await;
    assert!(
        big_done < 30,
        "the small keys waited for the big one: {big_done} of 60 done"
    );
    wait_all_final(&db.pool, &ids[..60], Duration::from_secs(60)).await;
    done.store(true, Ordering::SeqCst);
    let max_per_key = sampler.await.unwrap();
    stop(replicas).await;
    assert!(max_per_key <= 2, "{max_per_key} of one key running at once");
    assert!(work.peak() >= 4, "keys ran side by side");
}

fn rate_test_tasks() -> usize {
    std::env::var("RATE_TEST_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks
        / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .unwrap()
            .unwrap() as f64
}

#[tokio::test]
async fn a_rate_limit_meters_starts_across_replicas_within_ten_percent_without_busy_polling() {
    let db = TestDb::new().await;
    limits::set(
        &db.pool,
        &limit(Scope::Kind, "noop", None, Some((20, 1000))),
    )
    .await
    .unwrap();
    let n = rate_test_tasks();
    let q = Queue::new(db.pool.clone(), 0);
    q.enqueue_many((0..n).map(|_| NewTask::new("noop", json!({}))).collect())
        .await
        .unwrap();
    let mut procs = Vec::new();
    for _ in 0..2 {
        let mut cmd = common::harness_at(&db.url);
        cmd.args(["serve", "--no-api"])
            .env("HARNESS_API__BIND", "127.0.0.1:0")
            .env("HARNESS_BULK__MAX_CONCURRENT", "16");
        procs.push(common::Proc::spawn(&mut cmd));
    }
    // Once both replicas are up, their CPU is counted until the last task starts.
    eventually("two replicas", Duration::from_secs(30), async || {
        (count(&db.pool, "SELECT count(*) FROM replicas").await == 2).then_some(())
    })
    .await;
    let cpu0: f64 = procs.iter().map(|p| cpu_seconds(p.pid())).sum();
    let t0 = Instant::now();
    eventually(
        "every task to start",
        Duration::from_secs(n as u64 / 10 + 60),
        async || {
            (count(
                &db.pool,
                "SELECT count(*) FROM tasks WHERE started_at IS NULL",
            )
            .await
                == 0)
                .then_some(())
        },
    )
    .await;
    let wall = t0.elapsed().as_secs_f64();
    let cpu: f64 = procs.iter().map(|p| cpu_seconds(p.pid())).sum::<f64>() - cpu0;
    // Starts per second between the first start and the last, by the database's clock.
    let span: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(started_at) - min(started_at))::float8 FROM tasks",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let rate = (n as f64 - 1.0) / span;
    eprintln!(
        "{n} tasks: {rate:.2} starts/s over {span:.1} s; the two replicas used {:.1} % of a core",
        cpu / wall * 100.0
    );
    assert!(
        (18.0..=22.0).contains(&rate),
        "{rate:.2} starts/s, limit 20/s"
    );
    assert!(
        cpu / wall < 0.25,
        "waiting for tokens cost {:.1} % of a core",
        cpu / wall * 100.0
    );
    drop(procs);
}

#[tokio::test]
async fn a_new_limit_binds_claims_at_once_and_a_removed_one_releases_its_tasks() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 0);
    let kinds = vec!["work".to_string()];
    q.enqueue_many((0..10).map(|_| NewTask::new("work", json!({}))).collect())
        .await
        .unwrap();
    // The handle reads the limits (none) on its first claim and caches them.
    assert_eq!(
        q.claim_from("r1", &[("default", 1)], &kinds)
            .await
            .unwrap()
            .len(),
        1
    );
    // A limit set elsewhere binds the next claim of this handle: 1 running already.
    limits::set(&db.pool, &limit(Scope::Queue, "default", Some(3), None))
        .await
        .unwrap();
    let round = q
        .claim_round("r1", &[("default", 10, 10)], &kinds)
        .await
        .unwrap();
    assert_eq!(round.rows.len(), 2, "3 at most, one running");
    assert!(round.held_back);
    assert!(
        q.claim_from("r2", &[("default", 10)], &kinds)
            .await
            .unwrap()
            .is_empty()
    );
    // A rate instead: a bucket of at most 100 ms of starts, at least one.
    limits::set(
        &db.pool,
        &limit(Scope::Queue, "default", None, Some((1, 60_000))),
    )
    .await
    .unwrap();
    let round = q
        .claim_round("r1", &[("default", 10, 10)], &kinds)
        .await
        .unwrap();
    assert_eq!(round.rows.len(), 1);
    let next = round.next_token_in.expect("when the next token comes");
    assert!(
        next > Duration::from_secs(50) && next <= Duration::from_secs(60),
        "{next:?}"
    );
    assert!(
        limits::remove(&db.pool, Scope::Queue, "default")
            .await
            .unwrap()
    );
    assert!(
        !limits::remove(&db.pool, Scope::Queue, "default")
            .await
            .unwrap()
    );
    assert_eq!(
        q.claim_from("r1", &[("default", 10)], &kinds)
            .await
            .unwrap()
            .len(),
        6
    );
}

#[tokio::test]
async fn bad_limits_are_refused_naming_the_field_and_nothing_is_stored() {
    let db = TestDb::new().await;
    for (l, field) in [
        (limit(Scope::Queue, "a b", Some(1), None), "target"),
        (limit(Scope::Agent, "x", Some(1), None), "target"),
        (limit(Scope::Kind, "", Some(1), None), "target"),
        (limit(Scope::Kind, "k", None, None), "concurrency"),
        (limit(Scope::Kind, "k", Some(0), None), "concurrency"),
        (limit(Scope::Kind, "k", None, Some((0, 1000))), "rate"),
        (limit(Scope::Kind, "k", None, Some((5, 0))), "interval"),
        (
            limit(Scope::Kind, "k", None, Some((5, 90_000_000))),
            "interval",
        ),
        (limit(Scope::Agent, "007", Some(1), None), "target"),
        (limit(Scope::Agent, "+7", Some(1), None), "target"),
    ] {
        let e = limits::set(&db.pool, &l).await.unwrap_err().to_string();
        assert!(e.contains(field), "{l:?}: {e}");
    }
    assert_eq!(count(&db.pool, "SELECT count(*) FROM limits").await, 0);
    for (text, ok) in [
        ("20/s", Some((20, 1000))),
        ("60/min", Some((60, 60_000))),
        ("1000/h", Some((1000, 3_600_000))),
        ("5/30s", Some((5, 30_000))),
        ("20", None),
        ("x/s", None),
        ("20/fortnight", None),
    ] {
        assert_eq!(limits::parse_rate(text).ok(), ok, "{text}");
    }
}

fn run(cmd: &mut std::process::Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn limits_are_set_listed_and_removed_from_the_cli() {
    let db = TestDb::new().await;
    let cli = || common::harness_at(&db.url);
    sqlx::query("INSERT INTO agents (name, runtime, command) VALUES ('llm', 'command', '{true}')")
        .execute(&db.pool)
        .await
        .unwrap();
    let (ok, out, err) = run(cli().args(["limits", "set", "agent:llm", "--concurrency", "3"]));
    assert!(ok, "{err}");
    assert!(out.contains("at most 3 running"), "{out}");
    let (ok, _, err) = run(cli().args(["limits", "set", "kind:echo", "--rate", "60/min"]));
    assert!(ok, "{err}");
    let (ok, out, _) = run(cli().args(["limits", "--json"]));
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    let all = v.as_array().unwrap();
    assert_eq!(all.len(), 2, "{v}");
    assert_eq!(all[0]["scope"], "agent");
    assert_eq!(all[0]["concurrency"], 3);
    assert_eq!(all[1]["rate"], 60);
    assert_eq!(all[1]["per_ms"], 60_000);
    let (_, table, _) = run(cli().args(["limits"]));
    assert!(
        table.contains("kind:echo") && table.contains("60/1m"),
        "{table}"
    );
    // An agent's limit is shown by the agent's name.
    assert!(table.contains("agent:llm"), "{table}");
    // The fleet view says what holds work back: a limit of one `work` task at a time, one
    // running, two waiting.
    let (ok, _, err) = run(cli().args(["limits", "set", "kind:work", "--concurrency", "1"]));
    assert!(ok, "{err}");
    let q = Queue::new(db.pool.clone(), 0);
    for _ in 0..3 {
        q.enqueue(NewTask::new("work", json!({}))).await.unwrap();
    }
    sqlx::query(
        "UPDATE tasks SET status = 'running', locked_by = 'r1', attempt = 1 \
         WHERE id = (SELECT min(id) FROM tasks)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (ok, fleet, err) = run(cli().args(["fleet"]));
    assert!(ok, "{err}");
    for line in [
        "limit: agent:llm, at most 3 running: 0 running, 0 held back",
        "limit: kind:echo, at most 60 starts per 1m: 0 running, 0 held back",
        "limit: kind:work, at most 1 running: 1 running, 2 held back",
    ] {
        assert!(fleet.contains(line), "{line:?} in {fleet}");
    }
    let (ok, out, err) = run(cli().args(["limits", "rm", "kind:work"]));
    assert!(
        ok && out.contains("limit on kind:work removed"),
        "{out} {err}"
    );
    sqlx::query("DELETE FROM tasks")
        .execute(&db.pool)
        .await
        .unwrap();
    for (args, says) in [
        (
            vec!["limits", "set", "agent:nobody", "--concurrency", "1"],
            "no agent",
        ),
        (vec!["limits", "set", "kind:echo", "--rate", "5"], "--rate"),
        (
            vec!["limits", "set", "shelf:x", "--concurrency", "1"],
            "not a scope",
        ),
        (vec!["limits", "set", "kind:echo"], "concurrency"),
        (vec!["limits", "rm", "queue:nothing"], "no limit"),
    ] {
        let (ok, _, err) = run(cli().args(&args));
        assert!(!ok, "{args:?}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let (ok, out, _) = run(cli().args(["stats", "--json"]));
    assert!(ok);
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["limits"].as_array().unwrap().len(), 2, "{stats}");
    let (ok, _, err) = run(cli().args(["limits", "rm", "kind:echo"]));
    assert!(ok, "{err}");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM limits").await, 1);
    // A task names its key from the CLI.
    let (ok, out, err) = run(cli().args(["enqueue", "echo", "{}", "--concurrency-key", "acme"]));
    assert!(ok, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_i64()
        .unwrap();
    let q = Queue::new(db.pool.clone(), 0);
    assert_eq!(
        q.get(id).await.unwrap().concurrency_key.as_deref(),
        Some("acme")
    );
}

#[tokio::test]
async fn a_limited_claim_that_found_nothing_rests_briefly_and_says_when_to_ask_again() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 0);
    let kinds = vec!["llm".to_string()];
    let ask = [("default", 10, 10)];
    limits::set(&db.pool, &limit(Scope::Kind, "llm", Some(5), None))
        .await
        .unwrap();
    // Nothing the limit applies to: the limited claim finds none, and is not made again for
    // a while.
    let r = q.claim_round("r1", &ask, &kinds).await.unwrap();
    assert!(r.rows.is_empty() && !r.held_back, "{r:?}");
    q.enqueue(NewTask::new("llm", json!({}))).await.unwrap();
    let r = q.claim_round("r1", &ask, &kinds).await.unwrap();
    assert!(r.rows.is_empty(), "claimed while resting: {r:?}");
    assert!(r.held_back);
    let wait = r.next_token_in.expect("when to ask again");
    assert!(wait <= limits::IDLE_RECHECK, "{wait:?}");
    tokio::time::sleep(wait).await;
    let r = q.claim_round("r1", &ask, &kinds).await.unwrap();
    assert_eq!(r.rows.len(), 1, "{r:?}");
}

#[tokio::test]
async fn limited_tasks_that_fill_every_free_slot_are_claimed_again_as_attempts_end() {
    let db = TestDb::new().await;
    // A limit that binds nothing, and a poll interval far longer than the work.
    limits::set(&db.pool, &limit(Scope::Kind, "work", Some(100), None))
        .await
        .unwrap();
    let work = Concurrency::default();
    let h = Harness::builder()
        .config(db.fast_config(&[
            ("HARNESS_WORKER__QUEUES", "{default: 2}"),
            ("HARNESS_BULK__POLL_INTERVAL_MS", "5000"),
        ]))
        .pool(db.pool.clone())
        .handler_with("work", work.handler(20))
        .build()
        .await
        .unwrap();
    let q = h.queue().clone();
    q.enqueue_many((0..40).map(|_| NewTask::new("work", json!({}))).collect())
        .await
        .unwrap();
    let t0 = Instant::now();
    let replicas = vec![serve(h)];
    eventually("40 limited tasks", Duration::from_secs(30), async || {
        (count(
            &db.pool,
            "SELECT count(*) FROM tasks WHERE status = 'completed'",
        )
        .await
            == 40)
            .then_some(())
    })
    .await;
    let took = t0.elapsed();
    stop(replicas).await;
    // Without asking again as attempts end, each round after the first waits out the poll.
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert_eq!(work.peak(), 2);
}
