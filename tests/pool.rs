//! The worker pool in process: handlers' outcomes, retries, capacity, cancel, graceful drain.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{TestDb, serve};
use harness::Harness;
use harness::queue::{NewTask, Status, Task};
use harness::worker::Handler;
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// Adds kind `stuck`: counts its starts in `started`, then sleeps 60 s (outlives any test).
fn with_stuck(
    b: harness::replica::HarnessBuilder,
    started: Arc<AtomicUsize>,
) -> harness::replica::HarnessBuilder {
    b.handler("stuck", move |_p: Value| {
        started.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, String>(json!({}))
        }
    })
}

async fn wait_final(db: &TestDb, id: i64, within: Duration) -> Task {
    common::wait_final(&db.pool, id, within).await
}

#[tokio::test]
async fn every_outcome_ends_in_its_status_and_never_stays_running() {
    let db = TestDb::new().await;
    let h = Harness::builder()
        .config(db.fast_config(&[]))
        .pool(db.pool.clone())
        .handler("ok", |p: Value| async move {
            Ok::<_, String>(json!({"result": p["value"]}))
        })
        .handler("fail", |_p: Value| async {
            Err::<Value, _>("out of cheese")
        })
        .handler("panic", |_p: Value| async {
            if true {
                panic!("boom at {}", 42);
            }
            Ok::<Value, String>(json!({}))
        })
        .handler_with(
            "slow",
            Handler::from_payload(|_p: Value| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<_, String>(json!({}))
            })
            .with_timeout(Duration::from_millis(300)),
        )
        .build()
        .await
        .unwrap();
    let q = h.queue().clone();
    let ok = q
        .enqueue(NewTask::new("ok", json!({"value": 42})))
        .await
        .unwrap()
        .id;
    let fail = q.enqueue(NewTask::new("fail", json!({}))).await.unwrap().id;
    let panic = q
        .enqueue(NewTask::new("panic", json!({})))
        .await
        .unwrap()
        .id;
    let slow = q.enqueue(NewTask::new("slow", json!({}))).await.unwrap().id;
    // A per-task timeout overrides the kind's.
    let slow_own = q
        .enqueue(NewTask::new("slow", json!({})).timeout(Duration::from_millis(100)))
        .await
        .unwrap()
        .id;
    let (stop, served) = serve(h);

    let t = wait_final(&db, ok, Duration::from_secs(10)).await;
    assert_eq!(
        (t.status, t.result),
        (Status::Completed, Some(json!({"result": 42})))
    );
    for (id, status, error) in [
        (fail, Status::Failed, "out of cheese"),
        (panic, Status::Failed, "handler panicked: boom at 42"),
        (slow, Status::Timeout, "timed out after 0.300s"),
        (slow_own, Status::Timeout, "timed out after 0.100s"),
    ] {
        let t = wait_final(&db, id, Duration::from_secs(10)).await;
        assert_eq!(t.status, status, "{t:?}");
        assert!(t.error.as_deref().unwrap_or("").contains(error), "{t:?}");
    }

    stop.send(()).unwrap();
    served.await.unwrap();
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'running'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(running, 0);
}

#[tokio::test]
async fn failures_retry_with_exponential_backoff_then_succeed() {
    let db = TestDb::new().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let h = Harness::builder()
        .config(db.fast_config(&[("HARNESS_BULK__RETRY_DELAY_SECONDS", "1")]))
        .pool(db.pool.clone())
        .handler("flaky", move |_p: Value| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(format!("attempt {} failed", n + 1))
                } else {
                    Ok(json!({"after": n + 1}))
                }
            }
        })
        .build()
        .await
        .unwrap();
    let id = h
        .queue()
        .enqueue(NewTask::new("flaky", json!({})).max_retries(3))
        .await
        .unwrap()
        .id;
    let (stop, served) = serve(h);
    let t = wait_final(&db, id, Duration::from_secs(20)).await;
    stop.send(()).unwrap();
    served.await.unwrap();

    assert_eq!(t.status, Status::Completed);
    assert_eq!((t.attempt, t.retry_count), (3, 2));
    assert_eq!(t.result, Some(json!({"after": 3})));
    let history = &t.attempts;
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].error.as_deref(), Some("attempt 1 failed"));
    // Retry n waits base × 2^(n-1) ± 20%: never before 0.8 s, then 1.6 s (the promise),
    // and not much after 1.2 s and 2.4 s (a loaded machine may claim a little late).
    let ended_1 = history[0].ended_at;
    let started_2 = history[1].started_at.unwrap();
    let ended_2 = history[1].ended_at;
    let gap1 = (started_2 - ended_1).num_milliseconds();
    let gap2 = (t.started_at.unwrap() - ended_2).num_milliseconds();
    assert!(
        (790..=1200 + 3000).contains(&gap1),
        "first retry after {gap1} ms"
    );
    assert!(
        (1590..=2400 + 3000).contains(&gap2),
        "second retry after {gap2} ms"
    );
}

#[tokio::test]
async fn never_more_running_than_capacity_and_priority_first() {
    let db = TestDb::new().await;
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (n, m, o) = (now.clone(), max.clone(), order.clone());
    let h = Harness::builder()
        .config(db.fast_config(&[("HARNESS_BULK__MAX_CONCURRENT", "3")]))
        .pool(db.pool.clone())
        .handler("work", move |p: Value| {
            let (n, m) = (n.clone(), m.clone());
            o.lock().unwrap().push(p["n"].as_i64().unwrap());
            async move {
                let running = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(40)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, String>(json!({}))
            }
        })
        .build()
        .await
        .unwrap();
    let q = h.queue().clone();
    let low: Vec<i64> = ids(
        &q,
        (0..20)
            .map(|i| NewTask::new("work", json!({"n": i})))
            .collect(),
    )
    .await;
    q.enqueue(NewTask::new("work", json!({"n": -1})).priority(5))
        .await
        .unwrap();
    let (stop, served) = serve(h);
    for id in &low {
        wait_final(&db, *id, Duration::from_secs(20)).await;
    }
    stop.send(()).unwrap();
    served.await.unwrap();
    assert_eq!(
        max.load(Ordering::SeqCst),
        3,
        "ran at most (and at best) 3 at once"
    );
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order[0], -1,
        "the high-priority task started first: {order:?}"
    );
    assert_eq!(
        &order[1..],
        (0..20).collect::<Vec<i64>>(),
        "then in enqueue order"
    );
}

#[tokio::test]
async fn a_running_task_is_cancelled_by_its_owner() {
    let db = TestDb::new().await;
    let started = Arc::new(tokio::sync::Notify::new());
    let s = started.clone();
    let h = Harness::builder()
        .config(db.fast_config(&[]))
        .pool(db.pool.clone())
        .handler("long", move |_p: Value| {
            let s = s.clone();
            async move {
                s.notify_one();
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<_, String>(json!({}))
            }
        })
        .build()
        .await
        .unwrap();
    let q = h.queue().clone();
    let id = q.enqueue(NewTask::new("long", json!({}))).await.unwrap().id;
    let (stop, served) = serve(h);
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("task started");
    let asked = tokio::time::Instant::now();
    assert_eq!(q.cancel(id).await.unwrap(), Status::Running);
    let t = wait_final(&db, id, Duration::from_secs(5)).await;
    assert_eq!(t.status, Status::Cancelled);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "aborted promptly: {:?}",
        asked.elapsed()
    );
    stop.send(()).unwrap();
    served.await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_finishes_or_returns_work_without_counting_attempts() {
    let db = TestDb::new().await;
    let started = Arc::new(AtomicUsize::new(0));
    let h = with_stuck(Harness::builder(), started.clone())
        .config(db.fast_config(&[
            ("HARNESS_BULK__MAX_CONCURRENT", "2"),
            ("HARNESS_BULK__SHUTDOWN_GRACE_S", "1"),
        ]))
        .pool(db.pool.clone())
        .handler("quick", |_p: Value| async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, String>(json!({}))
        })
        .build()
        .await
        .unwrap();
    let replica = h.replica_id().to_string();
    let q = h.queue().clone();
    let quick = q
        .enqueue(NewTask::new("quick", json!({})).priority(9))
        .await
        .unwrap()
        .id;
    let stuck = q
        .enqueue(NewTask::new("stuck", json!({})).priority(8))
        .await
        .unwrap()
        .id;
    let waiting: Vec<i64> = ids(&q, vec![NewTask::new("stuck", json!({})); 4]).await;
    let (stop, served) = serve(h);
    // Both slots busy: `quick` and `stuck` are running.
    common::eventually("stuck to start", Duration::from_secs(30), async || {
        (started.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    stop.send(()).unwrap();
    let t0 = tokio::time::Instant::now();
    served.await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "drain took {:?}",
        t0.elapsed()
    );

    // The quick one finished within the grace period.
    assert_eq!(q.get(quick).await.unwrap().status, Status::Completed);
    // The stuck one outlived the grace: back to pending, its attempt not counted.
    let t = q.get(stuck).await.unwrap();
    assert_eq!(
        (t.status, t.attempt, t.retry_count),
        (Status::Pending, 0, 0),
        "{t:?}"
    );
    for id in waiting {
        let t = q.get(id).await.unwrap();
        assert_eq!((t.status, t.attempt), (Status::Pending, 0), "{t:?}");
    }
    // The replica deregistered.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM replicas WHERE id = $1")
        .bind(&replica)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn capacity_changes_apply_without_restarting_workers() {
    let db = TestDb::new().await;
    let work = common::Concurrency::default();
    let h = Harness::builder()
        .config(db.fast_config(&[("HARNESS_BULK__MAX_CONCURRENT", "6")]))
        .pool(db.pool.clone())
        .handler_with("work", work.handler(30))
        .build()
        .await
        .unwrap();
    let capacity = h.capacity();
    let q = h.queue().clone();
    let ids: Vec<i64> = ids(&q, vec![NewTask::new("work", json!({})); 120]).await;
    let (stop, served) = serve(h);
    // Under full load (6 at once), lower the grant to 2.
    for id in &ids[..20] {
        wait_final(&db, *id, Duration::from_secs(20)).await;
    }
    assert_eq!(work.peak(), 6);
    capacity.set(2);
    // Tasks already running finish; then no more than 2 run at once.
    common::eventually(
        "the running tasks to drop to 2",
        Duration::from_secs(20),
        async || (work.running() <= 2).then_some(()),
    )
    .await;
    work.reset_peak();
    for id in &ids[..70] {
        wait_final(&db, *id, Duration::from_secs(20)).await;
    }
    assert_eq!(work.peak(), 2, "a decrease under load takes effect");
    capacity.set(5);
    work.reset_peak();
    for id in &ids {
        wait_final(&db, *id, Duration::from_secs(20)).await;
    }
    stop.send(()).unwrap();
    served.await.unwrap();
    let peak = work.peak();
    assert!(
        peak > 2 && peak <= 5,
        "after raising the grant to 5, peak was {peak}"
    );
}

#[tokio::test]
async fn a_task_rescued_and_reclaimed_by_the_same_replica_completes() {
    let db = TestDb::new().await;
    let h = Harness::builder()
        .config(db.fast_config(&[("HARNESS_BULK__MAX_CONCURRENT", "2")]))
        .pool(db.pool.clone())
        .handler_with(
            "slow",
            Handler::from_context(|ctx| async move {
                // The first attempt ends first; the second must still be recorded.
                let ms = if ctx.attempt == 1 { 600 } else { 1200 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(json!({ "attempt": ctx.attempt }))
            }),
        )
        .build()
        .await
        .unwrap();
    let q = h.queue().clone();
    let id = q.enqueue(NewTask::new("slow", json!({}))).await.unwrap().id;
    let (stop, served) = serve(h);
    common::eventually("the task to run", Duration::from_secs(30), async || {
        (q.get(id).await.unwrap().status == Status::Running).then_some(())
    })
    .await;
    // As a rescue would (e.g. after a heartbeat stall): back to the queue mid-run.
    sqlx::query("UPDATE tasks SET status = 'pending', locked_by = NULL WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    let t = wait_final(&db, id, Duration::from_secs(10)).await;
    stop.send(()).unwrap();
    served.await.unwrap();
    assert_eq!(t.status, Status::Completed, "{t:?}");
    assert_eq!((t.attempt, t.result), (2, Some(json!({"attempt": 2}))));
}

#[tokio::test]
async fn claiming_stops_while_heartbeats_fail_and_resumes_when_they_return() {
    let db = TestDb::new().await;
    let mut cmd = common::harness_at(&db.url);
    cmd.arg("serve")
        .arg("--no-api")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null());
    let (replica, log) = common::Proc::spawn_logged(&mut cmd);
    let q = harness::queue::Queue::new(db.pool.clone(), 0);
    common::eventually(
        "the replica to register",
        Duration::from_secs(20),
        async || {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM replicas")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            (n == 1).then_some(())
        },
    )
    .await;
    // Heartbeats block (and time out) while the replicas table is locked.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE replicas IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    common::eventually("claiming to stop", Duration::from_secs(30), async || {
        log.contains("claiming stops").then_some(())
    })
    .await;
    let id = q.enqueue(NewTask::new("noop", json!({}))).await.unwrap().id;
    // Thirty polls (every 100 ms) pass over it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        q.get(id).await.unwrap().status,
        Status::Pending,
        "nothing is claimed while the replica cannot heartbeat"
    );
    blocker.rollback().await.unwrap();
    let t = wait_final(&db, id, Duration::from_secs(30)).await;
    assert_eq!(t.status, Status::Completed);
    assert!(log.contains("claiming again"), "{}", log.text());
    drop(replica);
}

#[tokio::test]
async fn running_rows_never_exceed_capacity_while_completions_are_written() {
    let db = TestDb::new().await;
    // Every completion takes 300 ms to write: a slot freed before its completion is durable
    // would let the replica claim more rows than it may run.
    sqlx::raw_sql(
        "CREATE FUNCTION slow_completion() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF OLD.status = 'running' AND NEW.status = 'completed' THEN
                 PERFORM pg_sleep(0.3);
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER slow_completion BEFORE UPDATE ON tasks
             FOR EACH ROW EXECUTE FUNCTION slow_completion();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let capacity = 2;
    let h = Harness::builder()
        .config(db.fast_config(&[
            ("HARNESS_BULK__MAX_CONCURRENT", "2"),
            ("HARNESS_BULK__PREFETCH", "0"),
        ]))
        .pool(db.pool.clone())
        .handler("quick", |_p: Value| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, String>(json!({}))
        })
        .build()
        .await
        .unwrap();
    let q = h.queue().clone();
    let ids: Vec<i64> = ids(&q, vec![NewTask::new("quick", json!({})); 12]).await;
    let (stop, served) = serve(h);
    let peak = peak_running_until_completed(&db, ids.len() as i64).await;
    assert!(
        peak <= capacity,
        "{peak} rows running at once on a replica with capacity {capacity}"
    );
    let _ = stop.send(());
    served.await.unwrap();
}

/// The peak of rows `running` in the database while `until_done` tasks complete.
async fn peak_running_until_completed(db: &TestDb, until_done: i64) -> i64 {
    let mut peak = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (running, done): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'running'), \
                    count(*) FILTER (WHERE status = 'completed') FROM tasks",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        peak = peak.max(running);
        if done >= until_done {
            return peak;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{done} of {until_done} done after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Rows of `kind` that are `running` (held by a replica, started or buffered).
async fn held(db: &TestDb, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks WHERE kind = $1 AND status = 'running'")
        .bind(kind)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_prefetching_pool_claims_ahead_but_runs_no_more_than_its_grant() {
    let db = TestDb::new().await;
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (n, m) = (now.clone(), max.clone());
    let h = Harness::builder()
        .config(db.fast_config(&[
            ("HARNESS_BULK__MAX_CONCURRENT", "2"),
            ("HARNESS_BULK__PREFETCH", "40"),
        ]))
        .pool(db.pool.clone())
        .handler("quick", move |_p: Value| {
            let (n, m) = (n.clone(), m.clone());
            async move {
                let running = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(running, Ordering::SeqCst);
                tokio::task::yield_now().await;
                n.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, String>(json!({}))
            }
        })
        .build()
        .await
        .unwrap();
    let tasks = 3000;
    h.queue()
        .enqueue_many(vec![NewTask::new("quick", json!({})); tasks])
        .await
        .unwrap();
    let (stop, served) = serve(h);
    let peak = peak_running_until_completed(&db, tasks as i64).await;
    let _ = stop.send(());
    served.await.unwrap();
    assert_eq!(
        max.load(Ordering::SeqCst),
        2,
        "ran at most (and at best) 2 at once"
    );
    assert!(
        peak > 2,
        "quick tasks are claimed ahead of free slots: at most {peak} rows held at once"
    );
    assert!(
        peak <= 42,
        "{peak} rows held at once by a replica with 2 slots and a prefetch of 40"
    );
}

#[tokio::test]
async fn a_row_that_waits_in_the_buffer_too_long_goes_back_to_an_idle_replica() {
    let db = TestDb::new().await;
    let ran_by = Arc::new(std::sync::Mutex::new(Vec::<&'static str>::new()));
    let slow = |who: &'static str, ran_by: Arc<std::sync::Mutex<Vec<&'static str>>>| {
        move |_p: Value| {
            let ran_by = ran_by.clone();
            async move {
                ran_by.lock().unwrap().push(who);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                Ok::<_, String>(json!({}))
            }
        }
    };
    // Replica a runs quick tasks, then slow ones; one slot, a buffer of 50.
    let a = Harness::builder()
        .config(db.fast_config(&[
            ("HARNESS_BULK__MAX_CONCURRENT", "1"),
            ("HARNESS_BULK__PREFETCH", "50"),
        ]))
        .pool(db.pool.clone())
        .handler("quick", |_p: Value| async { Ok::<_, String>(json!({})) })
        .handler("slow", slow("a", ran_by.clone()))
        .build()
        .await
        .unwrap();
    let q = a.queue().clone();
    q.enqueue_many(vec![NewTask::new("quick", json!({})).priority(1); 2000])
        .await
        .unwrap();
    q.enqueue_many(vec![NewTask::new("slow", json!({})); 4])
        .await
        .unwrap();
    let (stop_a, served_a) = serve(a);
    // At the quick tasks' pace, a claims the slow ones into its buffer as well.
    common::eventually(
        "replica a to hold all four slow tasks",
        Duration::from_secs(30),
        async || (held(&db, "slow").await == 4).then_some(()),
    )
    .await;
    // Replica b serves slow tasks only, and is idle.
    let b = Harness::builder()
        .config(db.fast_config(&[("HARNESS_BULK__MAX_CONCURRENT", "1")]))
        .pool(db.pool.clone())
        .handler("slow", slow("b", ran_by.clone()))
        .build()
        .await
        .unwrap();
    let (stop_b, served_b) = serve(b);
    peak_running_until_completed(&db, 2004).await;
    for stop in [stop_a, stop_b] {
        let _ = stop.send(());
    }
    served_a.await.unwrap();
    served_b.await.unwrap();
    let ran_by = ran_by.lock().unwrap().clone();
    assert_eq!(ran_by.len(), 4, "each slow task ran once: {ran_by:?}");
    let attempts: Vec<i32> =
        sqlx::query_scalar("SELECT attempt FROM tasks WHERE kind = 'slow' ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        attempts,
        vec![1; 4],
        "a task handed back from the buffer did not count an attempt"
    );
    assert!(
        ran_by.contains(&"b"),
        "rows that waited over a second in a's buffer went back, and idle b ran some: {ran_by:?}"
    );
}

/// A replica with one slot and a prefetch of 50, serving: it runs 2,000 quick tasks, then six
/// that never end. Returns once one of those runs and, claimed at the quick tasks' pace, the
/// other five wait in its buffer. Returns the ids of the six, its capacity and how to stop it.
async fn five_buffered_behind_a_stuck_task(
    db: &TestDb,
) -> (
    Vec<i64>,
    Arc<harness::worker::Capacity>,
    harness::queue::Queue,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let started = Arc::new(AtomicUsize::new(0));
    let h = with_stuck(Harness::builder(), started.clone())
        .config(db.fast_config(&[
            ("HARNESS_BULK__MAX_CONCURRENT", "1"),
            ("HARNESS_BULK__PREFETCH", "50"),
            ("HARNESS_BULK__SHUTDOWN_GRACE_S", "1"),
        ]))
        .pool(db.pool.clone())
        .handler("quick", |_p: Value| async { Ok::<_, String>(json!({})) })
        .build()
        .await
        .unwrap();
    let capacity = h.capacity();
    let q = h.queue().clone();
    q.enqueue_many(vec![NewTask::new("quick", json!({})).priority(1); 2000])
        .await
        .unwrap();
    let stuck: Vec<i64> = ids(&q, vec![NewTask::new("stuck", json!({})); 6]).await;
    let (stop, served) = serve(h);
    // The last quick tasks may still be ahead of them: wait for one stuck task to start.
    common::eventually(
        "one stuck task running and the other five held",
        Duration::from_secs(30),
        async || {
            (started.load(Ordering::SeqCst) == 1 && held(db, "stuck").await == 6).then_some(())
        },
    )
    .await;
    (stuck, capacity, q, stop, served)
}

#[tokio::test]
async fn shutdown_hands_buffered_tasks_back_without_counting_attempts() {
    let db = TestDb::new().await;
    let (stuck, _, q, stop, served) = five_buffered_behind_a_stuck_task(&db).await;
    stop.send(()).unwrap();
    served.await.unwrap();
    for id in stuck {
        let t = q.get(id).await.unwrap();
        assert_eq!(
            (t.status, t.attempt, t.retry_count),
            (Status::Pending, 0, 0),
            "{t:?}"
        );
    }
}

#[tokio::test]
async fn a_paused_replica_hands_its_buffer_back() {
    let db = TestDb::new().await;
    let (_, capacity, _, stop, served) = five_buffered_behind_a_stuck_task(&db).await;
    // Paused (what the governor does): the five buffered tasks, which have waited a few
    // milliseconds, go back within a sweep (not after the buffer's second), the running one
    // goes on, and nothing new is claimed.
    capacity.set(0);
    let t0 = std::time::Instant::now();
    common::eventually(
        "the buffered tasks back in the queue",
        Duration::from_secs(5),
        async || (held(&db, "stuck").await == 1).then_some(()),
    )
    .await;
    assert!(
        t0.elapsed() < Duration::from_millis(600),
        "{:?}",
        t0.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        held(&db, "stuck").await,
        1,
        "a paused replica claims nothing"
    );
    let pending: Vec<(i32, i32)> = sqlx::query_as(
        "SELECT attempt, retry_count FROM tasks WHERE kind = 'stuck' AND status = 'pending'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        pending,
        vec![(0, 0); 5],
        "handed back without counting attempts"
    );
    let _ = stop.send(());
    served.await.unwrap();
}

/// Enqueues `tasks` in one statement; their ids, in order.
async fn ids(q: &harness::queue::Queue, tasks: Vec<NewTask>) -> Vec<i64> {
    q.enqueue_many(tasks)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect()
}

/// A pool of kind `count` (counting its starts), with `rescue_after` as given, on a database
/// where every claim of a task is counted too ([`claims`]).
async fn counting_pool(
    db: &TestDb,
    rescue_after_s: &str,
) -> (
    harness::worker::Worker,
    Arc<AtomicUsize>,
    harness::queue::Queue,
) {
    use harness::worker::{Capacity, Registry, Worker, WorkerOptions};
    sqlx::raw_sql(
        "CREATE TABLE claims (n int NOT NULL); INSERT INTO claims VALUES (0);
         CREATE FUNCTION count_claim() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN UPDATE claims SET n = n + 1; RETURN NULL; END $$;
         CREATE TRIGGER count_claim AFTER UPDATE ON tasks FOR EACH ROW
             WHEN (NEW.status = 'running' AND OLD.status <> 'running')
             EXECUTE FUNCTION count_claim();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let cfg = db.fast_config(&[("HARNESS_PERSISTENCE__RESCUE_AFTER_S", rescue_after_s)]);
    let q = harness::queue::Queue::new(db.pool.clone(), 0);
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    let mut registry = Registry::default();
    registry.insert(
        "count",
        Handler::from_payload(move |_| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(json!({}))
            }
        }),
    );
    let worker = Worker::start(
        q.clone(),
        Arc::new(registry),
        Capacity::new(2),
        WorkerOptions::from_config(&cfg, "lease-test"),
        Arc::new(tokio::sync::Notify::new()),
    );
    (worker, started, q)
}

/// How many times tasks were claimed (see [`counting_pool`]).
async fn claims(db: &TestDb) -> i32 {
    sqlx::query_scalar("SELECT n FROM claims")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// A pool whose heartbeats broke off for longer than three quarters of `rescue_after` (so
/// another replica may be taking its tasks over) claims nothing until a beat gets through
/// again; then the task runs, once.
#[tokio::test]
async fn nothing_is_claimed_while_the_heartbeats_are_broken_off() {
    use std::time::Instant;
    let db = TestDb::new().await;
    let (worker, started, q) = counting_pool(&db, "4").await;
    let pool = worker.handle();
    // The last beat that got through was sent 5 s ago: over 3 s (three quarters of 4 s).
    let long_ago = Instant::now() - Duration::from_secs(5);
    pool.beat_through(long_ago, long_ago);
    let id = q
        .enqueue(NewTask::new("count", json!({})))
        .await
        .unwrap()
        .id;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(claims(&db).await, 0, "claimed without a lease");
    // A beat gets through: claims made from now on start.
    pool.beat_through(Instant::now(), Instant::now());
    let t = wait_final(&db, id, Duration::from_secs(10)).await;
    assert_eq!(t.status, Status::Completed);
    assert_eq!((started.load(Ordering::SeqCst), t.attempt), (1, 1));
    worker.shutdown().await;
}

/// A claim made while the lease held, answered after a beat that got through only after a
/// break of three quarters of `rescue_after`: another replica may have taken the task over
/// meanwhile, so it is given back, not started — although the claim is younger than
/// `claim_max_age` — and runs at the next claim, its given-back attempt not counted.
#[tokio::test]
async fn a_claim_outlived_by_a_break_in_the_heartbeats_is_given_back_not_started() {
    use std::time::Instant;
    let db = TestDb::new().await;
    // rescue_after 8 s: a break of 6 s loses the lease; claims older than 4 s are stale.
    let (worker, started, q) = counting_pool(&db, "8").await;
    // Every claim of this task takes 3 s to commit.
    sqlx::raw_sql(
        "CREATE FUNCTION slow_claim() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.status = 'running' AND OLD.status <> 'running' THEN
                 PERFORM pg_sleep(3);
             END IF;
             RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER slow_claim AFTER UPDATE ON tasks
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_claim();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let pool = worker.handle();
    // The last beat got through 4 s ago: the lease holds (under 6 s), and the claim goes out.
    let last = Instant::now() - Duration::from_secs(4);
    pool.beat_through(last, last);
    let id = q
        .enqueue(NewTask::new("count", json!({})))
        .await
        .unwrap()
        .id;
    common::eventually("the claim's COMMIT", Duration::from_secs(5), async || {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query = 'COMMIT'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (n == 1).then_some(())
    })
    .await;
    // While it commits, the next beat gets through: 6 s or more after the last one.
    tokio::time::sleep_until((last + Duration::from_millis(6200)).into()).await;
    pool.beat_through(Instant::now(), Instant::now());
    let t = wait_final(&db, id, Duration::from_secs(20)).await;
    assert_eq!(t.status, Status::Completed);
    assert_eq!(claims(&db).await, 2, "the first claim was started");
    assert_eq!(started.load(Ordering::SeqCst), 1);
    assert_eq!(t.attempt, 1, "the attempt given back was counted");
    assert!(t.attempts.is_empty(), "{:?}", t.attempts);
    worker.shutdown().await;
}
