//! One bad completion never wedges a replica: text PostgreSQL cannot store is made storable,
//! a row that still cannot be written fails alone, and a handoff for an agent that is gone is
//! skipped — and the replica keeps running what comes next.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestDb, serve};
use harness::Harness;
use harness::agents::{AgentSettings, AgentSpec, Agents};
use harness::executor::{Executor, Runtime};
use harness::queue::{NewTask, Queue, Status, Task};
use harness::replica::builtin_handlers;
use serde_json::{Value, json};

async fn wait_final(q: &Queue, id: i64, within: Duration) -> Task {
    common::wait_final(q.pool(), id, within).await
}

async fn replica_with_agents(db: &TestDb) -> (Harness, Agents) {
    let cfg = db.fast_config(&[]);
    let executor = Arc::new(Executor::new(&cfg.executor).unwrap());
    let agents = Agents::new(db.pool.clone(), executor);
    let h = builtin_handlers(Harness::builder())
        .agents(agents.clone())
        .config(cfg)
        .pool(db.pool.clone())
        .build()
        .await
        .unwrap();
    (h, agents)
}

fn python_agent(name: &str, code: &str, cfg: &harness::Config) -> AgentSpec {
    AgentSpec {
        name: name.to_string(),
        runtime: Runtime::Python {
            code: code.to_string(),
        },
        settings: AgentSettings {
            max_retries: 0,
            ..AgentSettings::defaults(cfg)
        },
        config: Default::default(),
    }
}

#[tokio::test]
async fn nul_characters_in_output_are_stored_visibly_and_the_replica_goes_on() {
    let db = TestDb::new().await;
    let (h, agents) = replica_with_agents(&db).await;
    let q = h.queue().clone();
    let agent = agents
        .create(python_agent(
            "nul",
            "class Agent:\n    def execute(self):\n        print('before\\x00after')\n\
             \x20       return {'s': 'x\\x00y', 'k\\x00': 1, 'state': {'t': '\\x00'}}\n",
            &db.config(),
        ))
        .await
        .unwrap();
    let (stop, served) = serve(h);

    let cmd = q
        .enqueue(NewTask::new(
            "command",
            json!({"argv": ["printf", "a\\000b"]}),
        ))
        .await
        .unwrap()
        .id;
    let run = agents.run(&q, "nul", Value::Null).await.unwrap().id;
    let cmd = wait_final(&q, cmd, Duration::from_secs(20)).await;
    let run = wait_final(&q, run, Duration::from_secs(20)).await;
    assert_eq!(cmd.status, Status::Completed, "{:?}", cmd.error);
    assert_eq!(cmd.result.as_ref().unwrap()["stdout"], "a\u{2400}b");
    assert_eq!(run.status, Status::Completed, "{:?}", run.error);
    let r = run.result.unwrap();
    assert_eq!(r["result"]["s"], "x\u{2400}y");
    assert_eq!(r["result"]["k\u{2400}"], 1);
    assert_eq!(r["stdout"], "before\u{2400}after\n");
    let handoff = agents
        .handoffs()
        .load_artifact(agent.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(handoff.state, json!({"t": "\u{2400}"}));

    // The replica is not wedged: the next task runs.
    let next = q
        .enqueue(NewTask::new("echo", json!({"after": true})))
        .await
        .unwrap()
        .id;
    assert_eq!(
        wait_final(&q, next, Duration::from_secs(10)).await.status,
        Status::Completed
    );
    let _ = stop.send(());
    served.await.unwrap();
}

#[tokio::test]
async fn deleting_an_agent_mid_run_skips_its_handoff_and_the_replica_goes_on() {
    let db = TestDb::new().await;
    let (h, agents) = replica_with_agents(&db).await;
    let q = h.queue().clone();
    agents
        .create(python_agent(
            "victim",
            "import time\nclass Agent:\n    def execute(self):\n\
             \x20       open(self.input['marker'], 'w').close()\n        time.sleep(1.5)\n\
             \x20       return {'n': 1}\n",
            &db.config(),
        ))
        .await
        .unwrap();
    let (stop, served) = serve(h);
    // The agent runs as another account: it marks its start in a directory it may write.
    let dir = common::agent_writable_dir("harness-victim-");
    let marker = dir.path().join("started");
    let run = agents
        .run(&q, "victim", json!({ "marker": marker }))
        .await
        .unwrap()
        .id;
    common::eventually("the agent to start", Duration::from_secs(30), async || {
        marker.exists().then_some(())
    })
    .await;
    agents.remove("victim").await.unwrap();

    let t = wait_final(&q, run, Duration::from_secs(15)).await;
    assert_eq!(t.status, Status::Completed, "{:?}", t.error);
    let handoffs: i64 = sqlx::query_scalar("SELECT count(*) FROM handoffs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(handoffs, 0);
    let next = q.enqueue(NewTask::new("echo", json!({}))).await.unwrap().id;
    assert_eq!(
        wait_final(&q, next, Duration::from_secs(10)).await.status,
        Status::Completed
    );
    let _ = stop.send(());
    served.await.unwrap();
}

#[tokio::test]
async fn a_result_number_jsonb_could_not_give_back_is_stored_as_text() {
    let db = TestDb::new().await;
    let h = Harness::builder()
        .config(db.fast_config(&[]))
        .pool(db.pool.clone())
        .handler("huge", |_p: Value| async {
            Ok::<_, String>(json!({"max": f64::MAX, "fine": 1e300}))
        })
        .handler(
            "echo",
            |payload: Value| async move { Ok::<_, String>(payload) },
        )
        .build()
        .await
        .unwrap();
    let q = h.queue().clone();
    let (stop, served) = serve(h);
    let id = q.enqueue(NewTask::new("huge", json!({}))).await.unwrap().id;
    let t = wait_final(&q, id, Duration::from_secs(10)).await;
    assert_eq!(t.status, Status::Completed, "{:?}", t.error);
    let r = t.result.unwrap();
    assert!(r["max"].is_string(), "{r}");
    assert_eq!(r["fine"], json!(1e300));
    // And the replica keeps claiming: the row reads back.
    let next = q.enqueue(NewTask::new("echo", json!({}))).await.unwrap().id;
    assert_eq!(
        wait_final(&q, next, Duration::from_secs(10)).await.status,
        Status::Completed
    );
    let _ = stop.send(());
    served.await.unwrap();
}

#[tokio::test]
async fn a_completion_that_cannot_be_stored_fails_its_task_alone() {
    let db = TestDb::new().await;
    // A row PostgreSQL refuses whatever we do: the database rejects this one result.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.result ? 'poison' THEN RAISE EXCEPTION 'poisoned result refused'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_poison BEFORE UPDATE ON tasks
             FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let n = 20;
    // Every attempt ends at the same moment, so their completions share batches.
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let h = Harness::builder()
        .config(db.fast_config(&[("HARNESS_BULK__MAX_CONCURRENT", "32")]))
        .pool(db.pool.clone())
        .handler("p", move |payload: Value| {
            let barrier = barrier.clone();
            async move {
                barrier.wait().await;
                Ok::<_, String>(payload)
            }
        })
        .handler(
            "echo",
            |payload: Value| async move { Ok::<_, String>(payload) },
        )
        .build()
        .await
        .unwrap();
    let q = h.queue().clone();
    let tasks: Vec<NewTask> = (0..n)
        .map(|i| {
            let payload = if i == 7 {
                json!({"poison": true})
            } else {
                json!({"i": i})
            };
            NewTask::new("p", payload)
        })
        .collect();
    let ids: Vec<i64> = q
        .enqueue_many(tasks)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let (stop, served) = serve(h);
    for (i, id) in ids.iter().enumerate() {
        let t = wait_final(&q, *id, Duration::from_secs(20)).await;
        if i == 7 {
            assert_eq!(t.status, Status::Failed);
            let err = t.error.unwrap();
            assert!(
                err.contains("could not be stored") && err.contains("poisoned result refused"),
                "{err}"
            );
        } else {
            assert_eq!(t.status, Status::Completed, "task {i}: {:?}", t.error);
        }
    }
    let next = q.enqueue(NewTask::new("echo", json!({}))).await.unwrap().id;
    assert_eq!(
        wait_final(&q, next, Duration::from_secs(10)).await.status,
        Status::Completed
    );
    let _ = stop.send(());
    served.await.unwrap();
}
