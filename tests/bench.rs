//! `harness bench --console`: the history it seeds is one the real code reads back, the
//! benchmark times every console page on a real replica and leaves no database behind, and
//! while it holds the scheduler's leader lock no agent run starts. `harness bench --api`
//! answers every call its three ways, and `harness bench --ceiling` claims and completes
//! every task; neither leaves a database behind.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::TestDb;
use harness::queue::{AttemptStatus, Queue, Status, SyntheticHistory};

#[tokio::test]
async fn a_synthetic_history_has_the_shape_of_a_busy_fleets_and_reads_back_as_real_tasks() {
    let db = TestDb::new().await;
    let mut settings = harness::agents::AgentSettings::defaults(&db.config());
    settings.schedule = Some("*/5 * * * *".to_string());
    let agents = harness::agents::seed_for_bench(&db.pool, 4, &settings)
        .await
        .unwrap();
    assert_eq!(agents.len(), 4);
    assert_eq!(agents[0].1, "agent-001");
    let agent_ids: Vec<i64> = agents.iter().map(|a| a.0).collect();
    let n = 20_000u64;
    let mut reported = Vec::new();
    let seeded = harness::queue::seed_history(
        &db.pool,
        &SyntheticHistory {
            tasks: n,
            agent_kind: harness::agents::AGENT_KIND.to_string(),
            agent_ids: agent_ids.clone(),
            span: Duration::from_secs(7 * 24 * 3600),
            until: chrono::Utc::now(),
        },
        |done, total| reported.push((done, total)),
    )
    .await
    .unwrap();
    assert_eq!(reported.last(), Some(&(n, n)));
    assert_eq!(seeded.last_id - seeded.first_id + 1, n as i64);

    let queue = Queue::new(db.pool.clone(), 3);
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats.total, n as i64);
    let share = |s: Status| stats.count(s) as f64 / n as f64;
    assert_eq!(stats.count(Status::Running), 0);
    for (status, want) in [
        (Status::Completed, 0.93),
        (Status::Failed, 0.04),
        (Status::Timeout, 0.01),
        (Status::Cancelled, 0.01),
        (Status::RetryScheduled, 0.005),
        (Status::Pending, 0.005),
    ] {
        assert!(
            (share(status) - want).abs() < want * 0.25,
            "{status}: {} of the tasks, not about {want}",
            share(status)
        );
    }
    // Nothing is due: no replica would run any of it.
    let waiting = harness::queue::waiting(&db.pool).await.unwrap();
    assert_eq!(waiting.due, 0);
    assert!(waiting.delayed > 0);

    let kinds: HashMap<String, i64> =
        sqlx::query_as("SELECT kind, count(*) FROM tasks GROUP BY kind")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let agent_share = kinds[harness::agents::AGENT_KIND] as f64 / n as f64;
    assert!(
        (agent_share - 0.6).abs() < 0.03,
        "agent runs: {agent_share}"
    );
    for kind in harness::queue::SYNTHETIC_KINDS {
        assert!(
            kinds.get(kind).copied().unwrap_or(0) > 500,
            "{kind}: {kinds:?}"
        );
    }
    assert_eq!(kinds[harness::queue::RARE_KIND], 20);
    let (oldest_rare, keyed, unordered): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT max(id) FROM tasks WHERE kind = $1), \
                (SELECT count(*) FROM tasks WHERE idempotency_key = 'key-' || id), \
                (SELECT count(*) FROM (SELECT created_at < lag(created_at) OVER (ORDER BY id) \
                     AS back FROM tasks) t WHERE back)",
    )
    .bind(harness::queue::RARE_KIND)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        oldest_rare < seeded.first_id + n as i64 / 20,
        "the rare kind is among the oldest"
    );
    assert!(
        (keyed as f64 / n as f64 - 0.1).abs() < 0.02,
        "keyed: {keyed}"
    );
    assert_eq!(unordered, 0, "created_at grows with the id");

    // Every row reads back through the queue's own types: attempts as AttemptRecords.
    let failed = queue.get(seeded.failed_id.unwrap()).await.unwrap();
    assert_eq!(failed.status, Status::Failed);
    assert!(failed.error.as_deref().unwrap().lines().count() > 3);
    assert!((1..=3).contains(&failed.attempts.len()));
    assert_eq!(failed.attempts.len() as i32, failed.attempt);
    assert!(
        failed
            .attempts
            .iter()
            .all(|a| a.status == AttemptStatus::Failed && a.replica.is_some())
    );
    assert!(queue.progress(failed.id).await.unwrap().is_some());
    let keyed = queue.get(seeded.keyed_id.unwrap()).await.unwrap();
    assert_eq!(
        keyed.idempotency_key.as_deref(),
        Some(format!("key-{}", keyed.id).as_str())
    );
    for status in [Status::Failed, Status::Timeout, Status::Completed] {
        let rows = queue
            .list(&harness::queue::TaskFilter {
                status: Some(status),
                limit: 200,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!rows.is_empty());
        for t in rows {
            if let Some(agent) = t.agent_id {
                assert!(agent_ids.contains(&agent));
                assert_eq!(t.payload["agent_id"], agent);
            }
        }
    }
}

#[tokio::test]
async fn bench_console_times_every_page_on_a_real_replica_and_drops_its_database() {
    let db = TestDb::new().await;
    let (pid, report) = run_bench(
        &db,
        &[
            "--console",
            "--tasks",
            "2000",
            "--agents",
            "5",
            "--runs",
            "3",
            // Per-page scan counts need 10 s per page to settle; not what this test checks.
            "--stats-wait",
            "0",
            "--json",
        ],
    )
    .await;
    assert_eq!(report["tasks"], 2000);
    assert_eq!(report["agents"], 5);
    assert_eq!(report["runs"], 3);
    let pages = report["pages"].as_array().unwrap();
    let names: Vec<&str> = pages.iter().map(|p| p["page"].as_str().unwrap()).collect();
    for want in [
        "/",
        "/tasks",
        "/tasks?status=failed",
        "/tasks?status=completed&before=",
        "/tasks?kind=reindex",
        "/tasks?kind=email&status=timeout",
        "/tasks?agent=agent-",
        "/tasks?q=key-",
        "/tasks/",
        "/agents",
        "/agents/agent-",
        "/fleet",
    ] {
        let found = names
            .iter()
            .any(|n| *n == want || (want.ends_with(['=', '-', '/']) && n.starts_with(want)));
        assert!(found, "{want} not among {names:?}");
    }
    let mut worst: f64 = 0.0;
    for p in pages {
        let (p50, p95, max) = (
            p["p50_ms"].as_f64().unwrap(),
            p["p95_ms"].as_f64().unwrap(),
            p["max_ms"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p95 && p95 <= max, "{p}");
        assert!(p["bytes"].as_u64().unwrap() > 0, "{p}");
        assert!(p["tasks_seq_scans"].is_i64(), "{p}");
        worst = worst.max(p95);
    }
    assert_eq!(report["worst_p95_ms"].as_f64().unwrap(), worst);
    assert!(report["tasks_seq_rows_read"].is_i64());

    assert_dropped(&db, &format!("harness_bench_console_{pid}")).await;
}

#[tokio::test]
async fn no_scheduled_agent_run_starts_while_the_benchmark_holds_the_leader_lock() {
    let db = TestDb::new().await;
    let mut settings = harness::agents::AgentSettings::defaults(&db.config());
    settings.schedule = Some("* * * * *".to_string());
    harness::agents::seed_for_bench(&db.pool, 1, &settings)
        .await
        .unwrap();
    // A tick within the misfire grace is due at once for whoever leads.
    sqlx::query("UPDATE agents SET last_fire_at = now() - interval '90 seconds'")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut lock = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    assert!(
        harness::scheduler::hold_leadership(&mut lock, "harness")
            .await
            .unwrap()
    );
    let mut cmd = common::harness_at(&db.url);
    cmd.env("HARNESS_SCHEDULER__ELECT_INTERVAL_S", "1")
        .arg("serve");
    let _replica = common::Proc::spawn(&mut cmd);
    let runs = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE kind = 'agent'")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    common::eventually(
        "the replica to register",
        Duration::from_secs(30),
        async || {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM replicas")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            (n > 0).then_some(())
        },
    )
    .await;
    // Three of the replica's election attempts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(runs().await, 0, "no run while the lock is held");
    // Let go: the replica leads and fires the due tick.
    <sqlx::PgConnection as sqlx::Connection>::close(lock)
        .await
        .unwrap();
    common::eventually(
        "the due tick once the lock is free",
        Duration::from_secs(30),
        async || (runs().await == 1).then_some(()),
    )
    .await;
}

/// `harness bench --api`: every call is answered (201 for the API), the three figures are
/// reported, and the run's database is dropped.
#[tokio::test]
async fn bench_api_times_single_enqueues_three_ways_and_drops_its_database() {
    let db = TestDb::new().await;
    let (pid, report) = run_bench(
        &db,
        &["--api", "--tasks", "300", "--clients", "8", "--json"],
    )
    .await;
    assert_eq!(report["tasks"], 300);
    assert_eq!(report["clients"], 8);
    for figure in [
        "api_per_s",
        "library_per_s",
        "library_one_commit_each_per_s",
    ] {
        assert!(report[figure].as_f64().unwrap() > 0.0, "{figure}: {report}");
    }
    assert_dropped(&db, &format!("harness_bench_api_{pid}_0")).await;
}

/// `harness bench --ceiling`: every task is claimed and completed by the two connections (the
/// run fails otherwise), a rate is reported, and the run's database is dropped.
#[tokio::test]
async fn bench_ceiling_claims_and_completes_every_task_and_drops_its_database() {
    let db = TestDb::new().await;
    let (pid, report) = run_bench(&db, &["--ceiling", "--tasks", "3000", "--json"]).await;
    assert_eq!(report["tasks"], 3000);
    assert_eq!(report["batch"], 500);
    assert!(report["ceiling_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert_dropped(&db, &format!("harness_bench_ceiling_{pid}_0")).await;
}

/// `harness bench --history`: processing on an empty database and on one with the history,
/// the API's first page over it, and the pruner deleting the old completed part of it (never
/// a failed task, nothing within the retention) while the replicas work; both databases are
/// dropped.
#[tokio::test]
async fn bench_history_processes_lists_and_prunes_over_a_history_and_drops_its_databases() {
    let db = TestDb::new().await;
    let (pid, report) = run_bench(&db, &["--history", "20000", "--tasks", "500", "--json"]).await;
    assert_eq!(report["history"], 20000);
    for figure in [
        "empty_per_s",
        "history_per_s",
        "list_p50_ms",
        "list_p95_ms",
        "prune_rows_per_s",
        "process_during_prune_per_s",
    ] {
        assert!(report[figure].as_f64().unwrap() > 0.0, "{figure}: {report}");
    }
    // Over the bench's own tasks only: the history's starts, 38 days back, would make it ~0.
    let (empty, full) = (
        report["empty_per_s"].as_f64().unwrap(),
        report["history_per_s"].as_f64().unwrap(),
    );
    assert!(full > empty / 10.0, "{report}");
    let run = &report["each_run"][0];
    let pruned = run["pruned"].as_u64().unwrap();
    // The old four fifths of the history, but the 1 % of them that failed: the pruner keeps
    // those, and the fifth that ended within the retention.
    assert_eq!(pruned, 15_840, "{report}");
    for suffix in ["empty", "full"] {
        assert_dropped(&db, &format!("harness_bench_history_{pid}_0_{suffix}")).await;
    }
}

/// Runs `harness bench ARGS` against the test's server; its pid and its JSON report.
async fn run_bench(db: &TestDb, args: &[&str]) -> (u32, serde_json::Value) {
    let mut cmd = tokio::process::Command::from(common::harness_command());
    let child = cmd
        .env("DATABASE_URL", &db.url)
        .kill_on_drop(true)
        .arg("bench")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (pid, report)
}

/// The benchmark's own database `name` is gone.
async fn assert_dropped(db: &TestDb, name: &str) {
    let left: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(!left, "the benchmark's database {name} is dropped");
}

#[tokio::test]
async fn bench_replicas_run_when_the_default_api_port_is_taken() {
    // A `harness up` on the same machine holds api.bind's default. The bench's replicas
    // used it too (the bench clears HARNESS_* from their environment), so each one exited
    // at once and the bench waited for tasks nobody ran.
    let held = std::net::TcpListener::bind("127.0.0.1:8080");
    let taken = held.is_ok() || std::net::TcpStream::connect("127.0.0.1:8080").is_ok();
    assert!(taken, "127.0.0.1:8080 is held for the test");
    let db = TestDb::new().await;
    let (_, report) = tokio::time::timeout(
        Duration::from_secs(120),
        run_bench(
            &db,
            &[
                "--tasks",
                "300",
                "--concurrency",
                "4",
                "--latency-samples",
                "5",
                "--json",
            ],
        ),
    )
    .await
    .expect("the bench finished within 2 minutes");
    assert!(report["process_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["prefetch"], 500, "{report}");
    drop(held);
}

#[tokio::test]
async fn the_bench_stops_when_every_replica_has_exited() {
    // The replica reads ./harness.yml (the bench clears HARNESS_* from its environment); one
    // that names no Python makes `harness serve` exit at once, while the bench itself needs
    // none. The bench used to wait 10 minutes for tasks nobody ran.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("harness.yml"),
        "executor:\n  python: /nonexistent/python3\n",
    )
    .unwrap();
    let db = TestDb::new().await;
    let mut cmd = tokio::process::Command::from(common::harness_command());
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        cmd.current_dir(dir.path())
            .env("DATABASE_URL", &db.url)
            .kill_on_drop(true)
            .args(["bench", "--tasks", "200", "--latency-samples", "5"])
            .output(),
    )
    .await
    .expect("the bench gave up within 2 minutes")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("every replica exited before the tasks were done"),
        "{stderr}"
    );
}
