//! Named queues: each task runs only on replicas that serve its queue, a queue's capacity
//! bounds what runs of it on a replica without taking other queues' slots, the claim reads no
//! row of a queue it does not serve, and a pause stops every replica's claims from a queue.

mod common;

use std::time::Duration;

use common::{Concurrency, TestDb, count, enqueue_ids, eventually, serve, stop, wait_all_final};
use harness::Harness;
use harness::queue::{NewTask, Queue, Status};
use serde_json::{Value, json};

/// A replica serving `queues` (YAML map) whose `work` kind takes `ms` and answers with `name`.
async fn replica(db: &TestDb, name: &str, queues: &str, ms: u64) -> Harness {
    let answer = name.to_string();
    Harness::builder()
        .config(db.fast_config(&[("HARNESS_WORKER__QUEUES", queues)]))
        .pool(db.pool.clone())
        .replica_id(name)
        .handler("work", move |_p: Value| {
            let answer = answer.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, String>(json!({ "replica": answer }))
            }
        })
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn each_task_runs_only_on_replicas_that_serve_its_queue() {
    let db = TestDb::new().await;
    let light = replica(&db, "light", "{default: 4, agents: 2}", 0).await;
    let heavy = replica(&db, "heavy", "{heavy: 2}", 0).await;
    let q = light.queue().clone();
    let replicas = vec![serve(light), serve(heavy)];
    let mut ids = Vec::new();
    for i in 0..60 {
        let queue = ["default", "agents", "heavy"][i % 3];
        let e = q
            .enqueue(NewTask::new("work", json!({})).queue(queue))
            .await
            .unwrap();
        ids.push((queue, e.id));
    }
    // A queue nobody serves: its task waits.
    let orphan = q
        .enqueue(NewTask::new("work", json!({})).queue("nobody"))
        .await
        .unwrap();
    for (queue, id) in &ids {
        let t = common::wait_final(&db.pool, *id, Duration::from_secs(30)).await;
        assert_eq!(t.status, Status::Completed, "{t:?}");
        assert_eq!(&t.queue, queue);
        let want = if *queue == "heavy" { "heavy" } else { "light" };
        assert_eq!(t.result.unwrap()["replica"], want, "task {id} of {queue}");
    }
    // The fleet records what each replica serves.
    let listed = harness::fleet::serving::queues(&db.pool, Duration::from_secs(30))
        .await
        .unwrap();
    let served = |name: &str| {
        listed
            .iter()
            .find(|v| v.queue.name == name)
            .map(|v| v.served_by.clone())
            .unwrap_or_default()
    };
    assert_eq!(served("default").get("light"), Some(&4));
    assert_eq!(served("agents").get("light"), Some(&2));
    assert_eq!(served("heavy").get("heavy"), Some(&2));
    assert!(!served("heavy").contains_key("light"));
    let nobody = listed.iter().find(|v| v.queue.name == "nobody").unwrap();
    assert!(nobody.served_by.is_empty());
    assert_eq!(nobody.queue.runnable, 1);
    stop(replicas).await;
    assert_eq!(q.get(orphan.id).await.unwrap().status, Status::Pending);
}

#[tokio::test]
async fn a_queues_capacity_bounds_what_runs_of_it_and_leaves_other_queues_their_slots() {
    let db = TestDb::new().await;
    let (heavy, light) = (Concurrency::default(), Concurrency::default());
    let h = Harness::builder()
        .config(db.fast_config(&[("HARNESS_WORKER__QUEUES", "{default: 4, heavy: 1}")]))
        .pool(db.pool.clone())
        .handler_with("heavy_work", heavy.handler(700))
        .handler_with("light_work", light.handler(50))
        .build()
        .await
        .unwrap();
    let q = h.queue().clone();
    // The heavy backlog first: it must not take the light queue's slots.
    let heavy_ids: Vec<i64> = enqueue_ids(
        &q,
        (0..6)
            .map(|_| NewTask::new("heavy_work", json!({})).queue("heavy"))
            .collect(),
    )
    .await;
    let light_ids: Vec<i64> = enqueue_ids(
        &q,
        (0..40)
            .map(|_| NewTask::new("light_work", json!({})))
            .collect(),
    )
    .await;
    let replicas = vec![serve(h)];
    wait_all_final(&db.pool, &light_ids, Duration::from_secs(30)).await;
    // Every light task ended while the heavy queue, one at a time, still had work.
    let heavy_done = count(
        &db.pool,
        "SELECT count(*) FROM tasks WHERE queue = 'heavy' AND status = 'completed'",
    )
    .await;
    assert!(heavy_done < 6, "the light queue waited for the heavy one");
    wait_all_final(&db.pool, &heavy_ids, Duration::from_secs(30)).await;
    stop(replicas).await;
    assert_eq!(heavy.peak(), 1, "the heavy queue's capacity is 1");
    assert_eq!(light.peak(), 4, "the light queue used its 4 slots");
}

#[tokio::test]
async fn the_claim_reads_no_row_of_a_queue_it_does_not_serve() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 0);
    // A big backlog of higher priority in another queue, and a little of ours.
    q.enqueue_many(
        (0..5000)
            .map(|_| NewTask::new("work", json!({})).queue("other").priority(10))
            .collect(),
    )
    .await
    .unwrap();
    q.enqueue_many((0..10).map(|_| NewTask::new("work", json!({}))).collect())
        .await
        .unwrap();
    let kinds = vec!["work".to_string()];
    let plan = q.claim_plan(&[("default", 10)], &kinds).await.unwrap();
    assert!(plan.contains("tasks_queue_claim_idx"), "{plan}");
    assert!(plan.contains("Index Cond: ((queue = q.name)"), "{plan}");
    assert!(!plan.contains("Rows Removed by Filter"), "{plan}");
    // The claim itself takes ours, and only ours.
    let claimed = q
        .claim_from("r1", &[("default", 100)], &kinds)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 10);
    assert!(claimed.iter().all(|c| c.queue == "default"));
}

#[tokio::test]
async fn a_pause_stops_every_replicas_claims_from_the_queue_within_a_second_and_resume_restarts_them()
 {
    let db = TestDb::new().await;
    let a = replica(&db, "a", "{default: 2, other: 2}", 20).await;
    let b = replica(&db, "b", "{default: 2, other: 2}", 20).await;
    let q = a.queue().clone();
    let replicas = vec![serve(a), serve(b)];
    let work = || NewTask::new("work", json!({}));
    // A backlog that keeps both replicas claiming from `default` for a while.
    q.enqueue_many((0..400).map(|_| work()).collect())
        .await
        .unwrap();
    eventually("work in progress", Duration::from_secs(20), async || {
        (count(
            &db.pool,
            "SELECT count(*) FROM tasks WHERE status = 'completed'",
        )
        .await
            > 20)
            .then_some(())
    })
    .await;
    assert!(
        harness::queue::queues::pause(&db.pool, "default", "maintenance")
            .await
            .unwrap()
    );
    // The other queue goes on while `default` is paused.
    let other = q.enqueue(work().queue("other")).await.unwrap();
    let t = common::wait_final(&db.pool, other.id, Duration::from_secs(10)).await;
    assert_eq!(t.status, Status::Completed);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let late: i64 = count(
        &db.pool,
        "SELECT count(*) FROM tasks t, queues p WHERE p.name = 'default' \
         AND t.queue = 'default' AND t.started_at > p.updated_at + interval '1 second'",
    )
    .await;
    assert_eq!(
        late, 0,
        "claims from a paused queue more than a second after the pause"
    );
    let waiting = count(
        &db.pool,
        "SELECT count(*) FROM tasks WHERE queue = 'default' AND status = 'pending'",
    )
    .await;
    assert!(waiting > 0, "the pause came after the backlog ended");
    let listed = harness::queue::queues::list(&db.pool).await.unwrap();
    let default = listed.iter().find(|l| l.name == "default").unwrap();
    assert!(default.paused);
    assert_eq!(default.reason, "maintenance");
    assert_eq!(default.running, 0);
    assert!(
        !harness::queue::queues::pause(&db.pool, "default", "")
            .await
            .unwrap()
    );
    // Resumed: claims start again, and all finish.
    assert!(
        harness::queue::queues::resume(&db.pool, "default")
            .await
            .unwrap()
    );
    eventually(
        "claims after the resume",
        Duration::from_secs(5),
        async || {
            (count(
                &db.pool,
                "SELECT count(*) FROM tasks t, queues p WHERE p.name = 'default' \
             AND t.queue = 'default' AND t.started_at >= p.updated_at",
            )
            .await
                > 0)
            .then_some(())
        },
    )
    .await;
    eventually(
        "the backlog to finish",
        Duration::from_secs(60),
        async || {
            (count(
                &db.pool,
                "SELECT count(*) FROM tasks WHERE status <> 'completed'",
            )
            .await
                == 0)
                .then_some(())
        },
    )
    .await;
    stop(replicas).await;
}

#[tokio::test]
async fn a_queue_name_that_cannot_exist_is_refused_naming_the_field() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 0);
    for bad in ["", "has space", &"x".repeat(65), "nul\0"] {
        let err = q
            .enqueue(NewTask::new("work", json!({})).queue(bad))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("queue"), "{bad:?}: {err}");
    }
    let err = harness::queue::queues::pause(&db.pool, "a b", "")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("queue"), "{err}");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM tasks").await, 0);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM queues").await, 0);
}

/// The chart's KEDA query (the printf format in helm/harness/templates/_helpers.tpl) for
/// `queues`, as the chart renders it.
fn chart_runnable_query(queues: &[&str]) -> String {
    let helpers = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("helm/harness/templates/_helpers.tpl"),
    )
    .unwrap();
    let start = helpers.find("printf \"SELECT (SELECT count(*)").unwrap() + "printf \"".len();
    let len = helpers[start..].find('"').unwrap();
    let quoted: Vec<String> = queues.iter().map(|q| format!("'{q}'")).collect();
    helpers[start..start + len].replace("%s", &quoted.join(", "))
}

#[tokio::test]
async fn the_charts_keda_query_counts_a_groups_backlog_and_running_tasks_through_indexes() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 0);
    let sql = chart_runnable_query(&["agents", "heavy"]);
    let task = |queue: &str| NewTask::new("work", json!({})).queue(queue);
    let mut batch: Vec<NewTask> = (0..3).map(|_| task("heavy")).collect();
    batch.extend((0..2).map(|_| task("agents")));
    batch.extend((0..2).map(|_| task("heavy").delay(Duration::from_secs(3600))));
    batch.extend((0..5000).map(|_| task("default")));
    q.enqueue_many(batch).await.unwrap();
    // One of them running: not runnable any more.
    q.claim_from("r1", &[("heavy", 1)], &["work".to_string()])
        .await
        .unwrap();
    sqlx::query("ANALYZE tasks")
        .execute(&db.pool)
        .await
        .unwrap();
    // 4 due (2 of heavy, 2 of agents) and the running one; not the delayed or other queues.
    assert_eq!(count(&db.pool, &sql).await, 5, "{sql}");
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {sql}"))
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan on tasks"), "{plan}");
    assert!(plan.contains("Index"), "{plan}");
    // A paused queue's backlog does not count; what it runs still does.
    harness::queue::queues::pause(&db.pool, "heavy", "")
        .await
        .unwrap();
    assert_eq!(count(&db.pool, &sql).await, 3);
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn the_cli_enqueues_into_a_queue_lists_pauses_and_resumes_it_with_a_serving_replica() {
    let db = TestDb::new().await;
    let cli = || common::harness_at(&db.url);
    let mut serve = cli();
    serve
        .args(["serve", "--no-api"])
        .env("HARNESS_WORKER__QUEUES", "{heavy: 2}")
        .env("HARNESS_API__BIND", "127.0.0.1:0");
    let replica = common::Proc::spawn(&mut serve);
    // Paused before its first task: the task waits, visible as runnable.
    let out = run(cli().args(["queues", "pause", "heavy", "--reason", "upgrade"]));
    assert!(out.contains("paused queue heavy"), "{out}");
    let out = run(cli().args(["enqueue", "echo", "{}", "--queue", "heavy"]));
    let id = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_i64()
        .unwrap();
    let listed = eventually(
        "the replica to register",
        Duration::from_secs(30),
        async || {
            let out = run(cli().args(["queues", "--json"]));
            let v: Value = serde_json::from_str(&out).unwrap();
            let heavy = v
                .as_array()
                .unwrap()
                .iter()
                .find(|q| q["name"] == "heavy")?
                .clone();
            (!heavy["served_by"].as_object().unwrap().is_empty()).then_some(heavy)
        },
    )
    .await;
    assert_eq!(listed["runnable"], 1, "{listed}");
    assert_eq!(listed["paused"], true);
    assert_eq!(listed["reason"], "upgrade");
    assert_eq!(
        listed["served_by"].as_object().unwrap().values().next(),
        Some(&json!(2))
    );
    let table = run(cli().args(["queues"]));
    assert!(table.contains("paused: upgrade"), "{table}");
    let fleet = run(cli().args(["fleet"]));
    assert!(fleet.contains("heavy:2"), "{fleet}");
    assert!(
        fleet.contains("paused: queue heavy (upgrade), 1 runnable"),
        "{fleet}"
    );
    let stats: Value = serde_json::from_str(&run(cli().args(["stats", "--json"]))).unwrap();
    assert_eq!(stats["queues"][0]["name"], "heavy", "{stats}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let q = Queue::new(db.pool.clone(), 0);
    assert_eq!(q.get(id).await.unwrap().status, Status::Pending);
    let out = run(cli().args(["queues", "resume", "heavy"]));
    assert!(out.contains("resumed queue heavy"), "{out}");
    let t = common::wait_final(&db.pool, id, Duration::from_secs(10)).await;
    assert_eq!(t.status, Status::Completed);
    // A bad name is refused, naming the field.
    let out = cli().args(["queues", "pause", "no such"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue"));
    drop(replica);
}

#[tokio::test]
async fn a_retried_task_keeps_its_queue_and_concurrency_key() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 0);
    let e = q
        .enqueue(
            NewTask::new("work", json!({}))
                .queue("heavy")
                .concurrency_key("acme"),
        )
        .await
        .unwrap();
    sqlx::query("UPDATE tasks SET status = 'failed', completed_at = now() WHERE id = $1")
        .bind(e.id)
        .execute(&db.pool)
        .await
        .unwrap();
    let again = q.retry(e.id).await.unwrap();
    assert_eq!(again.queue, "heavy");
    assert_eq!(again.concurrency_key.as_deref(), Some("acme"));
}
