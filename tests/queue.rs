//! The queue's SQL protocol against a real PostgreSQL: enqueue, idempotency, claim order,
//! delays, fenced completion, retries, rescue, release, cancel, prune.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::TestDb;
use harness::fleet::Heartbeat;
use harness::queue::{AttemptStatus, Completion, Error, NewTask, Outcome, Queue, Status};
use serde_json::json;

fn kinds() -> Vec<String> {
    vec!["demo".to_string()]
}

fn queue(db: &TestDb) -> Queue {
    Queue::new(db.pool.clone(), 3)
}

fn done(id: i64, attempt: i32, outcome: Outcome) -> Completion {
    Completion {
        id,
        attempt,
        outcome,
        retry_at: Utc::now(),
        handoff: None,
    }
}

#[tokio::test]
async fn every_lifecycle_transition() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let e = q
        .enqueue(NewTask::new("demo", json!({"value": 42})))
        .await
        .unwrap();
    assert_eq!(e.status, Status::Pending);
    assert!(!e.deduplicated);

    // pending → running
    let c = q.claim("r1", 10, &kinds()).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].id, c[0].attempt), (e.id, 1));
    let t = q.get(e.id).await.unwrap();
    assert_eq!(t.status, Status::Running);
    assert_eq!(t.replica.as_deref(), Some("r1"));
    assert!(t.started_at.is_some());

    // running → completed
    assert_eq!(
        q.complete(
            "r1",
            &[done(e.id, 1, Outcome::Success(json!({"result": 42})))]
        )
        .await
        .unwrap(),
        1
    );
    let t = q.get(e.id).await.unwrap();
    assert_eq!(t.status, Status::Completed);
    assert_eq!(t.result, Some(json!({"result": 42})));
    assert!(t.completed_at.is_some() && t.replica.is_none());
    assert!(t.created_at <= t.started_at.unwrap() && t.started_at <= t.completed_at);

    // running → retry_scheduled → running → failed (max_retries 1)
    let f = q
        .enqueue(NewTask::new("demo", json!({})).max_retries(1))
        .await
        .unwrap();
    let c = q.claim("r1", 1, &kinds()).await.unwrap();
    q.complete(
        "r1",
        &[done(f.id, c[0].attempt, Outcome::Failed("boom 1".into()))],
    )
    .await
    .unwrap();
    let t = q.get(f.id).await.unwrap();
    assert_eq!((t.status, t.retry_count), (Status::RetryScheduled, 1));
    assert_eq!(t.error.as_deref(), Some("boom 1"));
    let c = q.claim("r1", 1, &kinds()).await.unwrap();
    assert_eq!(c[0].attempt, 2);
    q.complete("r1", &[done(f.id, 2, Outcome::Failed("boom 2".into()))])
        .await
        .unwrap();
    let t = q.get(f.id).await.unwrap();
    assert_eq!(t.status, Status::Failed);
    assert_eq!(t.error.as_deref(), Some("boom 2"));
    let history = &t.attempts;
    assert_eq!(
        history.len(),
        2,
        "every attempt's error is kept: {history:?}"
    );
    assert_eq!(history[0].error.as_deref(), Some("boom 1"));
    assert_eq!(history[1].attempt, 2);

    // running → timeout (no retries)
    let to = q
        .enqueue(NewTask::new("demo", json!({})).max_retries(0))
        .await
        .unwrap();
    q.claim("r1", 1, &kinds()).await.unwrap();
    q.complete(
        "r1",
        &[done(
            to.id,
            1,
            Outcome::TimedOut("timed out after 1s".into()),
        )],
    )
    .await
    .unwrap();
    assert_eq!(q.get(to.id).await.unwrap().status, Status::Timeout);

    // pending → cancelled
    let p = q.enqueue(NewTask::new("demo", json!({}))).await.unwrap();
    assert_eq!(q.cancel(p.id).await.unwrap(), Status::Cancelled);
    assert!(
        q.claim("r1", 10, &kinds()).await.unwrap().is_empty(),
        "a cancelled task is never claimed"
    );
    assert!(matches!(
        q.cancel(p.id).await,
        Err(Error::WrongState { .. })
    ));

    // running → cancel requested → cancelled by its owner
    let r = q.enqueue(NewTask::new("demo", json!({}))).await.unwrap();
    q.claim("r1", 1, &kinds()).await.unwrap();
    assert_eq!(q.cancel(r.id).await.unwrap(), Status::Running);
    assert_eq!(q.held_by("r1").await.unwrap(), vec![(r.id, 1, true)]);
    q.complete("r1", &[done(r.id, 1, Outcome::Cancelled)])
        .await
        .unwrap();
    assert_eq!(q.get(r.id).await.unwrap().status, Status::Cancelled);

    let s = q.stats().await.unwrap();
    assert_eq!(s.total, 5);
    assert_eq!(s.count(Status::Completed), 1);
    assert_eq!(s.count(Status::Cancelled), 2);
    assert_eq!(s.success_rate, 33.3);
}

#[tokio::test]
async fn idempotency_key_returns_the_existing_task_and_success_is_reused() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let first = q
        .enqueue(NewTask::new("demo", json!({"v": 1})).idempotency_key("k1"))
        .await
        .unwrap();
    let c = q.claim("r1", 1, &kinds()).await.unwrap();
    q.complete(
        "r1",
        &[done(
            first.id,
            c[0].attempt,
            Outcome::Success(json!({"ok": true})),
        )],
    )
    .await
    .unwrap();

    let again = q
        .enqueue(NewTask::new("demo", json!({"v": 2})).idempotency_key("k1"))
        .await
        .unwrap();
    assert_eq!(
        again,
        harness::queue::Enqueued {
            id: first.id,
            status: Status::Completed,
            deduplicated: true
        }
    );
    assert!(
        q.claim("r1", 10, &kinds()).await.unwrap().is_empty(),
        "a succeeded task is never run again"
    );
    let t = q.get(first.id).await.unwrap();
    assert_eq!(t.result, Some(json!({"ok": true})));
    assert_eq!(t.payload, json!({"v": 1}), "the stored task is untouched");
}

#[tokio::test]
async fn eight_concurrent_enqueues_of_one_key_make_one_row() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let mut handles = Vec::new();
    for i in 0..8 {
        let q = q.clone();
        handles.push(tokio::spawn(async move {
            q.enqueue(NewTask::new("demo", json!({"i": i})).idempotency_key("same"))
                .await
                .unwrap()
        }));
    }
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.unwrap());
    }
    let ids: std::collections::HashSet<_> = results.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(results.iter().filter(|r| !r.deduplicated).count(), 1);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

/// Concurrent single enqueues are written together (far fewer commits than calls), and each
/// call's answer is what it would be alone: its own new task, or the task its key names.
#[tokio::test]
async fn concurrent_single_enqueues_share_commits_and_keep_their_answers() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let commits = async || -> i64 {
        sqlx::query_scalar(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    // Statistics are flushed when a backend's transaction ends, at most once a second.
    let settle = async || {
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&db.pool)
            .await
            .unwrap();
    };
    settle().await;
    let before = commits().await;
    let mut handles = Vec::new();
    for i in 0..600u32 {
        let q = q.clone();
        handles.push(tokio::spawn(async move {
            let mut t = NewTask::new("demo", json!({"i": i}));
            // Every tenth call shares one of six keys with nine others.
            if i % 10 == 0 {
                t = t.idempotency_key(format!("k{}", (i / 10) % 6));
            }
            // One bad task among them fails alone.
            if i == 7 {
                t = NewTask::new("", json!({}));
            }
            (i, q.enqueue(t).await)
        }));
    }
    let mut answers = Vec::new();
    for h in handles {
        answers.push(h.await.unwrap());
    }
    settle().await;
    let used = commits().await - before;
    let bad = answers.iter().find(|(i, _)| *i == 7).unwrap();
    assert!(
        matches!(
            bad.1,
            Err(harness::queue::Error::Invalid { field: "kind", .. })
        ),
        "{:?}",
        bad.1
    );
    let ok: Vec<(u32, harness::queue::Enqueued)> = answers
        .into_iter()
        .filter_map(|(i, r)| r.ok().map(|e| (i, e)))
        .collect();
    assert_eq!(ok.len(), 599);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // 539 unkeyed (the bad one is not written), and one task per key (k0..k5) for the 60
    // keyed calls.
    assert_eq!(rows, 539 + 6);
    for k in 0..6 {
        let ids: std::collections::HashSet<i64> = ok
            .iter()
            .filter(|(i, _)| i % 10 == 0 && (i / 10) % 6 == k)
            .map(|(_, e)| e.id)
            .collect();
        assert_eq!(ids.len(), 1, "key k{k} names one task");
        let fresh = ok
            .iter()
            .filter(|(i, e)| i % 10 == 0 && (i / 10) % 6 == k && !e.deduplicated)
            .count();
        assert_eq!(
            fresh, 1,
            "key k{k}: one call wrote it, the others were told it exists"
        );
    }
    // Unkeyed calls got distinct tasks holding their own payloads.
    let t = q
        .get(ok.iter().find(|(i, _)| *i == 123).unwrap().1.id)
        .await
        .unwrap();
    assert_eq!(t.payload, json!({"i": 123}));
    assert!(used < 300, "600 calls took {used} commits");
}

#[tokio::test]
async fn concurrent_bulk_enqueues_with_overlapping_keys_never_deadlock() {
    let db = TestDb::new().await;
    let q = queue(&db);
    // Eight batches of 200 keys each, every batch overlapping its neighbours by half and in
    // its own order: the lock order must not depend on the order keys arrive in.
    let mut handles = Vec::new();
    for b in 0..8u32 {
        let q = q.clone();
        let mut keys: Vec<u32> = (b * 100..b * 100 + 200).collect();
        if b % 2 == 1 {
            keys.reverse();
        }
        handles.push(tokio::spawn(async move {
            let tasks = keys
                .iter()
                .map(|k| NewTask::new("demo", json!({})).idempotency_key(format!("k{k}")))
                .collect();
            tokio::time::timeout(Duration::from_secs(60), q.enqueue_many(tasks))
                .await
                .expect("no deadlock")
                .unwrap()
        }));
    }
    let mut created = 0;
    for h in handles {
        let batch = h.await.unwrap();
        let new: Vec<i64> = batch
            .iter()
            .filter(|e| !e.deduplicated)
            .map(|e| e.id)
            .collect();
        // A batch's new rows have ids in the order it gave them, so they run in that order.
        assert!(new.windows(2).all(|w| w[0] < w[1]), "{new:?}");
        created += new.len();
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Keys k0 .. k899: each stored once, and each counted as new by exactly one caller.
    assert_eq!((rows, created), (900, 900));
}

#[tokio::test]
async fn a_payload_over_sixteen_mebibytes_is_refused_and_one_under_is_stored() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let limit = harness::queue::MAX_PAYLOAD_BYTES;
    // {"s":"…"} is 8 bytes around the string.
    let fits = json!({ "s": "x".repeat(limit - 8) });
    let e = q.enqueue(NewTask::new("demo", fits)).await.unwrap();
    assert_eq!(
        q.get(e.id).await.unwrap().payload["s"]
            .as_str()
            .unwrap()
            .len(),
        limit - 8
    );
    let over = json!({ "s": "x".repeat(limit - 7) });
    match q.enqueue(NewTask::new("demo", over)).await {
        Err(Error::Invalid { field, reason }) => {
            assert_eq!(field, "payload");
            assert!(reason.contains("16777216 bytes"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn bulk_enqueue_with_duplicates_reports_which_existed() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let existing = q
        .enqueue(NewTask::new("demo", json!({})).idempotency_key("old"))
        .await
        .unwrap();
    let batch = vec![
        NewTask::new("demo", json!({"n": 0})),
        NewTask::new("demo", json!({"n": 1})).idempotency_key("old"),
        NewTask::new("demo", json!({"n": 2})).idempotency_key("new"),
        NewTask::new("demo", json!({"n": 3})),
        NewTask::new("demo", json!({"n": 4})).idempotency_key("new"),
        NewTask::new("demo", json!({"n": 5})),
    ];
    let out = q.enqueue_many(batch).await.unwrap();
    assert_eq!(out.len(), 6);
    let dedup: Vec<bool> = out.iter().map(|e| e.deduplicated).collect();
    assert_eq!(dedup, [false, true, false, false, true, false]);
    assert_eq!(out[1].id, existing.id);
    assert_eq!(out[2].id, out[4].id);
    // Entries map to their own rows, in input order.
    for (i, e) in out.iter().enumerate() {
        if !e.deduplicated {
            let t = q.get(e.id).await.unwrap();
            assert_eq!(t.payload["n"], i, "entry {i} maps to its own row");
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 5);
}

#[tokio::test]
async fn enqueue_inside_a_transaction_exists_only_on_commit() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let mut tx = db.pool.begin().await.unwrap();
    let e = q
        .enqueue_in(&mut tx, NewTask::new("demo", json!({})))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(matches!(q.get(e.id).await, Err(Error::NotFound(_))));

    let mut tx = db.pool.begin().await.unwrap();
    let many = q
        .enqueue_many_in(&mut tx, vec![NewTask::new("demo", json!({})); 3])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for e in many {
        assert_eq!(q.get(e.id).await.unwrap().status, Status::Pending);
    }
}

#[tokio::test]
async fn claims_follow_priority_then_schedule_and_never_exceed_the_limit() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let low = q
        .enqueue(NewTask::new("demo", json!({})).priority(-5))
        .await
        .unwrap();
    let mid1 = q.enqueue(NewTask::new("demo", json!({}))).await.unwrap();
    let mid2 = q.enqueue(NewTask::new("demo", json!({}))).await.unwrap();
    let high = q
        .enqueue(NewTask::new("demo", json!({})).priority(10))
        .await
        .unwrap();

    let first = q.claim("r1", 2, &kinds()).await.unwrap();
    assert_eq!(
        first.iter().map(|c| c.id).collect::<Vec<_>>(),
        [high.id, mid1.id]
    );
    let rest = q.claim("r2", 10, &kinds()).await.unwrap();
    assert_eq!(
        rest.iter().map(|c| c.id).collect::<Vec<_>>(),
        [mid2.id, low.id]
    );
    assert!(q.claim("r3", 0, &kinds()).await.unwrap().is_empty());
}

#[tokio::test]
async fn delayed_task_is_not_claimed_early() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let enqueued = std::time::Instant::now();
    let later = q
        .enqueue(NewTask::new("demo", json!({})).delay(Duration::from_millis(600)))
        .await
        .unwrap();
    let at = q
        .enqueue(NewTask::new("demo", json!({})).run_at(Utc::now() + chrono::Duration::hours(1)))
        .await
        .unwrap();
    assert!(q.claim("r1", 10, &kinds()).await.unwrap().is_empty());
    let c = common::eventually("the delayed task", Duration::from_secs(20), async || {
        let c = q.claim("r1", 10, &kinds()).await.unwrap();
        (!c.is_empty()).then_some(c)
    })
    .await;
    assert!(
        enqueued.elapsed() >= Duration::from_millis(600),
        "claimed {:?} after enqueue",
        enqueued.elapsed()
    );
    assert_eq!(c.iter().map(|c| c.id).collect::<Vec<_>>(), [later.id]);
    assert_eq!(q.get(at.id).await.unwrap().status, Status::Pending);
}

#[tokio::test]
async fn a_stale_attempt_never_overwrites_a_newer_one() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let e = q.enqueue(NewTask::new("demo", json!({}))).await.unwrap();
    q.claim("dead", 1, &kinds()).await.unwrap();
    // "dead" never heartbeated: its task is rescued and claimed again by "live".
    assert_eq!(q.rescue(Duration::from_secs(10)).await.unwrap(), vec![e.id]);
    let c = q.claim("live", 1, &kinds()).await.unwrap();
    assert_eq!(c[0].attempt, 2);
    // The old attempt reports late: fenced out.
    assert_eq!(
        q.complete("dead", &[done(e.id, 1, Outcome::Success(json!("stale")))])
            .await
            .unwrap(),
        0
    );
    assert_eq!(q.get(e.id).await.unwrap().status, Status::Running);
    // Even with the right owner name, the attempt number fences it.
    assert_eq!(
        q.complete("live", &[done(e.id, 1, Outcome::Success(json!("stale")))])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        q.complete("live", &[done(e.id, 2, Outcome::Success(json!("fresh")))])
            .await
            .unwrap(),
        1
    );
    let t = q.get(e.id).await.unwrap();
    assert_eq!(t.result, Some(json!("fresh")));
    assert_eq!(t.attempts[0].status, AttemptStatus::Lost);
}

#[tokio::test]
async fn rescue_spares_live_replicas_and_counts_the_attempt() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let mut hb = Heartbeat::new((*db.pool.connect_options()).clone(), "alive");
    hb.beat(1, 8, Duration::from_secs(5)).await.unwrap();
    let a = q.enqueue(NewTask::new("demo", json!({}))).await.unwrap();
    q.claim("alive", 1, &kinds()).await.unwrap();
    let b = q
        .enqueue(NewTask::new("demo", json!({})).max_retries(0))
        .await
        .unwrap();
    q.claim("gone", 1, &kinds()).await.unwrap();

    let rescued = q.rescue(Duration::from_secs(10)).await.unwrap();
    assert_eq!(rescued, vec![b.id]);
    assert_eq!(q.get(a.id).await.unwrap().status, Status::Running);
    let t = q.get(b.id).await.unwrap();
    assert_eq!(
        t.status,
        Status::Failed,
        "no retries left: the lost attempt fails it"
    );
    assert!(t.error.unwrap().contains("stopped heartbeating"));

    // An old heartbeat counts as dead, once the server itself has been up for longer than
    // the threshold (staleness counts from the server's start at the earliest).
    sqlx::query("UPDATE replicas SET heartbeat_at = now() - interval '1 minute'")
        .execute(&db.pool)
        .await
        .unwrap();
    let young: bool =
        sqlx::query_scalar("SELECT pg_postmaster_start_time() > now() - interval '10 s'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    if young {
        assert_eq!(
            q.rescue(Duration::from_secs(10)).await.unwrap(),
            Vec::<i64>::new()
        );
    }
    let uptime: f64 =
        sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())::float8")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let threshold = Duration::from_secs_f64((uptime / 2.0).min(10.0));
    assert_eq!(q.rescue(threshold).await.unwrap(), vec![a.id]);
    let t = q.get(a.id).await.unwrap();
    assert_eq!((t.status, t.retry_count), (Status::Pending, 1));
    hb.deregister().await.unwrap();
}

#[tokio::test]
async fn release_returns_work_without_counting_an_attempt() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let e = q.enqueue(NewTask::new("demo", json!({}))).await.unwrap();
    q.claim("r1", 1, &kinds()).await.unwrap();
    // Fenced by the attempt: an older attempt's release touches nothing.
    assert_eq!(q.release("r1", &[(e.id, 0)]).await.unwrap(), 0);
    assert_eq!(q.release("r2", &[(e.id, 1)]).await.unwrap(), 0);
    assert_eq!(q.release("r1", &[(e.id, 1)]).await.unwrap(), 1);
    let t = q.get(e.id).await.unwrap();
    assert_eq!(
        (t.status, t.attempt, t.retry_count),
        (Status::Pending, 0, 0)
    );
    assert_eq!(q.claim("r2", 1, &kinds()).await.unwrap()[0].attempt, 1);
}

#[tokio::test]
async fn bad_input_names_the_field_and_stores_nothing() {
    let db = TestDb::new().await;
    let q = queue(&db);
    for (task, field) in [
        (NewTask::new("", json!({})), "kind"),
        (NewTask::new("has space", json!({})), "kind"),
        (
            NewTask::new("demo", json!({})).idempotency_key(""),
            "idempotency_key",
        ),
        (
            NewTask::new("demo", json!({})).max_retries(5000),
            "max_retries",
        ),
        (
            NewTask::new("demo", json!({})).timeout(Duration::ZERO),
            "timeout",
        ),
    ] {
        match q.enqueue(task).await {
            Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected invalid {field}, got {other:?}"),
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn prune_deletes_old_finished_tasks_in_batches() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let ids: Vec<i64> = q
        .enqueue_many(vec![NewTask::new("demo", json!({})); 25])
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let claimed = q.claim("r1", 20, &kinds()).await.unwrap();
    let batch: Vec<_> = claimed
        .iter()
        .map(|c| done(c.id, c.attempt, Outcome::Success(json!({}))))
        .collect();
    q.complete("r1", &batch).await.unwrap();
    q.cancel(ids[24]).await.unwrap();
    // 15 of the completed ones are old, and so is the cancelled one.
    let old: Vec<i64> = ids[..15].iter().chain([&ids[24]]).copied().collect();
    sqlx::query("UPDATE tasks SET completed_at = now() - interval '8 days' WHERE id = ANY($1)")
        .bind(&old)
        .execute(&db.pool)
        .await
        .unwrap();
    // Two pending ones end as old failures, which are kept.
    sqlx::query(
        "UPDATE tasks SET status = CASE WHEN id = $1 THEN 'failed' ELSE 'timeout' END, \
                          completed_at = now() - interval '8 days' \
         WHERE id IN ($1, $2)",
    )
    .bind(ids[22])
    .bind(ids[23])
    .execute(&db.pool)
    .await
    .unwrap();
    // Every DELETE statement records how many rows it took.
    sqlx::raw_sql(
        "CREATE TABLE deletes (n bigint);
         CREATE FUNCTION count_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO deletes SELECT count(*) FROM gone; RETURN NULL; END $$;
         CREATE TRIGGER count_deletes AFTER DELETE ON tasks REFERENCING OLD TABLE AS gone
             FOR EACH STATEMENT EXECUTE FUNCTION count_deletes();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let pruned = q.prune(Duration::from_secs(7 * 86400), 4).await.unwrap();
    assert_eq!(pruned, 16);
    let batches: Vec<i64> = sqlx::query_scalar("SELECT n FROM deletes WHERE n > 0")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(batches, [4, 4, 4, 4], "deleted in batches of at most 4");
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM tasks ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    // The recent completed ones, the still-pending ones and the old failures stay.
    assert_eq!(left, ids[15..24].to_vec());
}

/// The queue's depth per status (the governor's gauges, `harness stats`): every status but
/// completed, counted right by its two index-served halves.
#[tokio::test]
async fn depth_counts_every_status_but_completed() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let tasks = q
        .enqueue_many(vec![NewTask::new("demo", json!({})); 12])
        .await
        .unwrap();
    // Two completed, failed, timed out, cancelled and retry_scheduled; one running; one left
    // pending.
    let plan = [
        ("completed", 2),
        ("failed", 2),
        ("timeout", 2),
        ("cancelled", 2),
        ("retry_scheduled", 2),
    ];
    let mut next = 0;
    for (status, n) in plan {
        for t in &tasks[next..next + n] {
            sqlx::query("UPDATE tasks SET status = $2 WHERE id = $1")
                .bind(t.id)
                .bind(status)
                .execute(&db.pool)
                .await
                .unwrap();
        }
        next += n;
    }
    sqlx::query("UPDATE tasks SET status = 'running', locked_by = 'r1' WHERE id = $1")
        .bind(tasks[next].id)
        .execute(&db.pool)
        .await
        .unwrap();
    let mut depth = harness::queue::depth(&db.pool).await.unwrap();
    depth.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(
        depth,
        vec![
            (Status::Cancelled, 2),
            (Status::Failed, 2),
            (Status::Pending, 1),
            (Status::RetryScheduled, 2),
            (Status::Running, 1),
            (Status::Timeout, 2),
        ]
    );
}

/// A call whose key another session holds (an uncommitted `enqueue_in`) waits for it alone:
/// the calls batched with it are written meanwhile, and it then answers with that task.
#[tokio::test]
async fn a_key_locked_elsewhere_holds_up_only_its_own_call() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let mut holder = db.pool.begin().await.unwrap();
    let held = q
        .enqueue_in(
            &mut holder,
            NewTask::new("demo", json!({"held": true})).idempotency_key("busy"),
        )
        .await
        .unwrap();
    let mut others = Vec::new();
    for i in 0..20 {
        let q = q.clone();
        others.push(tokio::spawn(async move {
            q.enqueue(NewTask::new("demo", json!({ "i": i }))).await
        }));
    }
    let keyed = {
        let q = q.clone();
        tokio::spawn(async move {
            q.enqueue(NewTask::new("demo", json!({"held": false})).idempotency_key("busy"))
                .await
        })
    };
    for h in others {
        let e = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .expect("an unkeyed call waited for another session's lock")
            .unwrap()
            .unwrap();
        assert!(!e.deduplicated);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!keyed.is_finished(), "the keyed call waits for the lock");
    holder.commit().await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), keyed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((e.id, e.deduplicated), (held.id, true));
}

/// With the database out of reach, every batched call fails with the pool's error, at once.
#[tokio::test]
async fn batched_calls_fail_together_when_the_database_is_out_of_reach() {
    let db = TestDb::new().await;
    let pool = harness::db::connect(&db.url, 2).await.unwrap();
    let q = Queue::new(pool.clone(), 0);
    q.enqueue(NewTask::new("demo", json!({}))).await.unwrap();
    pool.close().await;
    let started = std::time::Instant::now();
    let mut calls = Vec::new();
    for i in 0..50 {
        let q = q.clone();
        calls.push(tokio::spawn(async move {
            q.enqueue(NewTask::new("demo", json!({ "i": i }))).await
        }));
    }
    for c in calls {
        let r = c.await.unwrap();
        assert!(
            matches!(r, Err(Error::Db(sqlx::Error::PoolClosed))),
            "{r:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A task delayed for later wakes no replica: a woken replica would find nothing due and pay a
/// claim that walks every waiting row. Work due now wakes them, whichever way it is enqueued.
#[tokio::test]
async fn only_work_due_now_wakes_replicas() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener
        .listen(harness::queue::TASKS_CHANNEL)
        .await
        .unwrap();
    let later = || NewTask::new("demo", json!({})).delay(Duration::from_secs(3600));
    let woke = async |listener: &mut sqlx::postgres::PgListener, within_ms: u64| {
        tokio::time::timeout(Duration::from_millis(within_ms), listener.recv())
            .await
            .is_ok()
    };

    // Delayed: a lone call, concurrent calls (batches with and without keys), a bulk enqueue,
    // a run_at ahead.
    q.enqueue(later()).await.unwrap();
    let mut calls = Vec::new();
    for i in 0..40 {
        let q = q.clone();
        let mut t = later();
        if i % 2 == 0 {
            t = t.idempotency_key(format!("later-{i}"));
        }
        calls.push(tokio::spawn(async move { q.enqueue(t).await }));
    }
    for c in calls {
        c.await.unwrap().unwrap();
    }
    q.enqueue_many(vec![later(), later().idempotency_key("bulk-later")])
        .await
        .unwrap();
    q.enqueue(NewTask::new("demo", json!({})).run_at(Utc::now() + chrono::Duration::hours(1)))
        .await
        .unwrap();
    assert!(
        !woke(&mut listener, 500).await,
        "a delayed task sent a NOTIFY"
    );

    // Due now, or with a run_at already past: one NOTIFY each time.
    q.enqueue(NewTask::new("demo", json!({}))).await.unwrap();
    assert!(
        woke(&mut listener, 5000).await,
        "a lone due task woke nobody"
    );
    q.enqueue_many(vec![later(), NewTask::new("demo", json!({"due": true}))])
        .await
        .unwrap();
    assert!(
        woke(&mut listener, 5000).await,
        "a bulk with a due task woke nobody"
    );
    q.enqueue(
        NewTask::new("demo", json!({}))
            .idempotency_key("past")
            .run_at(Utc::now() - chrono::Duration::minutes(1)),
    )
    .await
    .unwrap();
    assert!(
        woke(&mut listener, 5000).await,
        "a run_at already past woke nobody"
    );
    // A key that already exists writes nothing, so it wakes nobody.
    let again = q
        .enqueue(NewTask::new("demo", json!({})).idempotency_key("past"))
        .await
        .unwrap();
    assert!(again.deduplicated);
    assert!(
        !woke(&mut listener, 500).await,
        "a deduplicated enqueue sent a NOTIFY"
    );
}

/// A batch with keys bounds its wait for row locks (200 ms), but not its COMMIT: a commit that
/// sends a NOTIFY takes the lock that orders notifications, and under load another session
/// can hold it for longer. Before, such a commit failed with a lock timeout and every call of
/// the batch got an error (the API answered 500). Here another session holds that lock for
/// a second (its own commit, with a NOTIFY, waits for a synchronous standby that never
/// comes): the batch waits, commits, and every call gets its task.
#[tokio::test]
async fn a_batch_commit_waits_for_the_notify_lock_instead_of_failing() {
    use sqlx::Connection;
    let pg = common::RestartableServer::start("notify").await;
    let url = pg.url("notify");
    let admin = harness::db::connect(&url, 2).await.unwrap();
    standbys(&admin, "'nobody'").await;
    // The queue's sessions do not wait for the standby (the holder's does).
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(6)
        .connect_with(options.options([("synchronous_commit", "local")]))
        .await
        .unwrap();
    let q = Queue::new(pool.clone(), 0);
    q.enqueue(NewTask::new("demo", json!({}))).await.unwrap(); // the writers are up

    // The holder: its commit takes the notify lock, then waits for the standby. Until the
    // server has taken in the reload, a commit does not wait: then it is tried again.
    let waiting = async |pid: i32| -> bool {
        sqlx::query_scalar(
            "SELECT coalesce(wait_event = 'SyncRep', false) FROM pg_stat_activity WHERE pid = $1",
        )
        .bind(pid)
        .fetch_one(&admin)
        .await
        .unwrap()
    };
    let t0 = std::time::Instant::now();
    let (holder_pid, holding) = 'hold: loop {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the holder's commit never waited for the standby"
        );
        let mut holder = sqlx::postgres::PgConnection::connect(&url).await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut holder)
            .await
            .unwrap();
        // Whatever the server's default, this commit waits for the standby.
        sqlx::query("SET synchronous_commit = on")
            .execute(&mut holder)
            .await
            .unwrap();
        let holding = tokio::spawn(async move {
            // A write, so that its commit is one to replicate.
            let _ = sqlx::Executor::execute(
                &mut holder,
                "BEGIN; CREATE TEMP TABLE IF NOT EXISTS held (); NOTIFY harness_tasks; COMMIT",
            )
            .await;
            holder
        });
        loop {
            if waiting(pid).await {
                break 'hold (pid, holding);
            }
            if holding.is_finished() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'hold;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    let started = std::time::Instant::now();
    let mut calls = Vec::new();
    for i in 0..30 {
        let q = q.clone();
        calls.push(tokio::spawn(async move {
            q.enqueue(NewTask::new("demo", json!({"i": i})).idempotency_key(format!("k{i}")))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Released: the holder's wait is cancelled (its transaction stays committed locally).
    sqlx::query("SELECT pg_cancel_backend($1)")
        .bind(holder_pid)
        .execute(&admin)
        .await
        .unwrap();
    for c in calls {
        let r = c.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE idempotency_key IS NOT NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 30);
    drop(holding.await.unwrap());
    pool.close().await;
    // Without a standby to wait for, the server stops at once (it took 30 s otherwise).
    standbys(&admin, "DEFAULT").await;
    admin.close().await;
}

/// Sets the server's `synchronous_standby_names` (a quoted list, or DEFAULT) and reloads.
async fn standbys(admin: &sqlx::PgPool, value: &str) {
    sqlx::query(&format!(
        "ALTER SYSTEM SET synchronous_standby_names = {value}"
    ))
    .execute(admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(admin)
        .await
        .unwrap();
}
