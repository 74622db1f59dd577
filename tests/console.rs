//! The web console in a real Chromium, against a real replica and PostgreSQL: signing in with
//! a token, a read token's view (no actions, its posts refused), a failed task's error and
//! output, a retry watched to completion without reloading, filters and pagination, and no
//! error in the browser's console on any page. Screenshots of the pages go to
//! `$CONSOLE_SCREENSHOTS_DIR` (docs/images for the README) or the target's tmp directory.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::TestDb;
use common::browser::Browser;
use harness::queue::{Queue, Status};
use serde_json::json;

const ADMIN: &str = "console-admin-token-0123456789";
const READ: &str = "console-read-token-0123456789";

fn enqueue(db: &TestDb, kind: &str, payload: &str) -> i64 {
    let o = common::harness_at(&db.url)
        .args(["enqueue", kind, payload, "--max-retries", "0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["id"].as_i64().unwrap()
}

fn screenshots_dir() -> std::path::PathBuf {
    std::env::var_os("CONSOLE_SCREENSHOTS_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots"),
        std::path::PathBuf::from,
    )
}

async fn save(browser: &Browser, name: &str) {
    let dir = screenshots_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("console-{name}.png")),
        browser.screenshot().await,
    )
    .unwrap();
}

async fn sign_in(browser: &Browser, base: &str, token: &str) {
    browser.goto(&format!("{base}/")).await;
    assert!(
        browser.url().await.contains("/login?next=%2F"),
        "{}",
        browser.url().await
    );
    browser.type_into("input[name=token]", token).await;
    browser.click("form[action='/login'] button").await;
    common::eventually("the overview", Duration::from_secs(10), async || {
        (browser.text("h1").await == "Overview").then_some(())
    })
    .await;
}

/// Waits until the element `css` of the page (not reloaded) says `want`.
async fn until_text(browser: &Browser, css: &str, want: &str) {
    let what = format!("{css} to show {want:?}");
    common::eventually(&what, Duration::from_secs(30), async || {
        browser.text(css).await.contains(want).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_console_signs_in_shows_a_failed_run_and_retries_it_live() {
    let Some(driver) = common::browser::driver_or_skip() else {
        return;
    };
    let db = TestDb::new().await;
    let dir = common::agent_writable_dir("console-");
    let marker = dir.path().join("failed-once");
    // Fails the first time (printing why), succeeds when retried.
    let script = format!(
        "echo said so; if [ -e {m} ]; then exit 0; else touch {m}; exit 1; fi",
        m = marker.display()
    );
    let flaky = enqueue(
        &db,
        "command",
        &json!({"argv": ["sh", "-c", script]}).to_string(),
    );
    let hello = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello_agent.py");
    let added = common::harness_at(&db.url)
        .args([
            "agents",
            "add",
            "greeter",
            "--file",
            hello,
            "--config",
            r#"{"name": "Ada", "api_key": "sk-secret-1"}"#,
        ])
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    // An agent whose run fails: the overview's "failing most".
    for args in [
        &[
            "agents",
            "add",
            "broken",
            "--command",
            "false",
            "--max-retries",
            "0",
        ][..],
        &["agents", "run", "broken"],
    ] {
        let o = common::harness_at(&db.url).args(args).output().unwrap();
        assert!(o.status.success(), "{o:?}");
    }
    let keyed = common::harness_at(&db.url)
        .args([
            "enqueue",
            "sleep",
            r#"{"ms": 1}"#,
            "--idempotency-key",
            "console-key-1",
        ])
        .output()
        .unwrap();
    assert!(keyed.status.success(), "{keyed:?}");
    let keyed = serde_json::from_slice::<serde_json::Value>(&keyed.stdout).unwrap()["id"]
        .as_i64()
        .unwrap();
    let mut echoes = Vec::new();
    for i in 0..55 {
        echoes.push(enqueue(&db, "echo", &json!({"i": i}).to_string()));
    }
    let port = common::free_port();
    let tokens =
        format!(r#"[{{"token":"{ADMIN}","scope":"admin"}},{{"token":"{READ}","scope":"read"}}]"#);
    let _replica = common::Proc::spawn(
        common::harness_at(&db.url)
            .arg("serve")
            .env("HARNESS_API__BIND", format!("127.0.0.1:{port}"))
            .env("HARNESS_API__TOKENS", &tokens)
            // Three failures hold the replica (its own escalation, no quarantine): the fleet
            // page's resume is clicked at the end.
            .env(
                "HARNESS_GOVERNANCE__PAUSE_AFTER_ERROR_BURST__THRESHOLD",
                "3",
            )
            .env("HARNESS_GOVERNANCE__HUMAN_REVIEW_AFTER_PAUSE_BURSTS", "1")
            .env(
                "HARNESS_GOVERNANCE__PAUSE_AFTER_ERROR_BURST__QUARANTINE_SHARE",
                "0",
            )
            .env("HARNESS_GOVERNANCE__WINDOW_S", "600")
            // A metrics row a second: the overview's charts fill at once.
            .env("HARNESS_TELEMETRY__LOG_INTERVAL_S", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let t = common::wait_final(&db.pool, flaky, Duration::from_secs(60)).await;
    assert_eq!(t.status, Status::Failed);
    common::wait_final(&db.pool, *echoes.last().unwrap(), Duration::from_secs(60)).await;
    let base = format!("http://127.0.0.1:{port}");

    // The pages may not be framed and run only their own script.
    let login = reqwest::get(format!("{base}/login")).await.unwrap();
    let csp = login.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'self'"));
    // The session cookie: HttpOnly, SameSite=Strict, and Secure when TLS was in front.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (proto, secure) in [("http", false), ("https", true)] {
        let r = no_redirects
            .post(format!("{base}/login"))
            .header("x-forwarded-proto", proto)
            .form(&[("token", READ), ("next", "/")])
            .send()
            .await
            .unwrap();
        let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
        assert!(
            cookie.starts_with("harness_session=read.")
                && cookie.contains("HttpOnly")
                && cookie.contains("SameSite=Strict")
                && cookie.contains("Secure") == secure,
            "{proto}: {cookie}"
        );
    }

    let browser = Browser::start(&driver).await;
    // A wrong token is refused on the page.
    browser.goto(&format!("{base}/tasks")).await;
    browser.type_into("input[name=token]", "not-a-token").await;
    browser.click("form[action='/login'] button").await;
    until_text(&browser, "[role=alert]", "not a token of this fleet").await;

    // A read token: everything visible, no actions.
    sign_in(&browser, &base, READ).await;
    assert!(browser.text("#counts").await.contains("failed"));
    // The last hour in charts (from the metrics rows), and the agent failing most.
    common::eventually(
        "a bar of completed tasks",
        Duration::from_secs(20),
        async || (!browser.all("#chart-completed rect").await.is_empty()).then_some(()),
    )
    .await;
    until_text(&browser, "#failing", "broken").await;
    assert!(!browser.all("#chart-failed rect").await.is_empty());
    assert!(!browser.all("#chart-pickup rect").await.is_empty());
    save(&browser, "overview").await;
    // Secrets in an agent's config are redacted for a reader, and it cannot edit.
    browser.goto(&format!("{base}/agents/greeter")).await;
    until_text(&browser, "#config", "[redacted]").await;
    assert!(!browser.text("#config").await.contains("sk-secret-1"));
    assert!(browser.all("details.edit").await.is_empty());
    browser.goto(&format!("{base}/tasks?status=failed")).await;
    until_text(&browser, "#task-list", &flaky.to_string()).await;
    assert!(
        browser.all("input[type=checkbox]").await.is_empty(),
        "a reader cannot select tasks for a bulk action"
    );
    browser.goto(&format!("{base}/tasks/{flaky}")).await;
    until_text(&browser, "#error", "exit code 1").await;
    until_text(&browser, "#logs", "said so").await;
    assert!(
        browser.all(".actions button").await.is_empty(),
        "a read token sees no actions"
    );
    // Its posts are refused, even with the page's own form token.
    let status = browser
        .run(&format!(
            "const x = new XMLHttpRequest(); x.open('POST', '/tasks/{flaky}/retry', false); \
             x.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded'); \
             x.send('csrf=' + document.querySelector('input[name=csrf]').value); \
             return x.status;"
        ))
        .await;
    assert_eq!(status, 403);
    let errors = browser.errors().await;
    assert!(
        errors.iter().all(|e| e.contains("403")),
        "only the refused post: {errors:?}"
    );
    browser.click("header form button").await;
    until_text(&browser, "h1", "Sign in").await;

    // An admin: retry the failed task and watch it complete on the page.
    sign_in(&browser, &base, ADMIN).await;
    browser.goto(&format!("{base}/tasks/{flaky}")).await;
    save(&browser, "failed-task").await;
    browser
        .click(".actions form[action$='/retry'] button")
        .await;
    common::eventually("the new task's page", Duration::from_secs(10), async || {
        let url = browser.url().await;
        (!url.ends_with(&format!("/tasks/{flaky}"))).then_some(())
    })
    .await;
    let url = browser.url().await;
    let retried: i64 = url.rsplit('/').next().unwrap().parse().unwrap();
    browser.run("window.notReloaded = true; return null;").await;
    until_text(&browser, "#task-fields", "completed").await;
    assert_eq!(
        browser.run("return window.notReloaded === true;").await,
        true
    );
    let q = Queue::new(db.pool.clone(), 0);
    assert_eq!(q.get(retried).await.unwrap().status, Status::Completed);

    // Search by idempotency key or id; time filters.
    browser.goto(&format!("{base}/tasks")).await;
    browser.type_into("input[name=q]", "console-key-1").await;
    browser.click("form[role=search] button").await;
    common::eventually(
        "the keyed task's page",
        Duration::from_secs(10),
        async || {
            browser
                .url()
                .await
                .ends_with(&format!("/tasks/{keyed}"))
                .then_some(())
        },
    )
    .await;
    browser.goto(&format!("{base}/tasks?q=no-such-key")).await;
    until_text(
        &browser,
        "[role=alert]",
        "No task has the id or idempotency key",
    )
    .await;
    browser.goto(&format!("{base}/tasks?q={flaky}")).await;
    until_text(&browser, "h1", &format!("Task {flaky}")).await;
    for (query, rows) in [
        ("since=2000-01-01T00:00", 50),
        ("since=2999-01-01T00:00", 0),
        ("until=2000-01-01T00:00", 0),
        ("until=2999-01-01T00:00", 50),
    ] {
        browser
            .goto(&format!("{base}/tasks?kind=echo&{query}"))
            .await;
        until_text(&browser, "h1", "Tasks").await;
        assert_eq!(
            browser.all("#task-list tbody tr").await.len(),
            rows,
            "{query}"
        );
    }
    browser.goto(&format!("{base}/tasks?since=yesterday")).await;
    until_text(
        &browser,
        "[role=alert]",
        "since \"yesterday\" is not a time",
    )
    .await;

    // Filters and keyset pagination: 50 a page, then older ones.
    browser.goto(&format!("{base}/tasks?kind=echo")).await;
    let first_page = browser.all("#task-list tbody tr").await.len();
    assert_eq!(first_page, 50);
    browser.click("a[rel=next]").await;
    common::eventually("the older page", Duration::from_secs(10), async || {
        (browser.all("#task-list tbody tr").await.len() == 5).then_some(())
    })
    .await;
    assert!(
        browser
            .text("#task-list")
            .await
            .contains(&echoes[0].to_string())
    );
    save(&browser, "tasks").await;

    // Bulk: select the newest page of echoes and delete them (after confirming).
    browser.goto(&format!("{base}/tasks?kind=echo")).await;
    until_text(&browser, "#task-list", &echoes[54].to_string()).await;
    browser.click("input[data-select-all]").await;
    assert_eq!(
        browser
            .run("return document.querySelectorAll('#task-list input[name=id]:checked').length;")
            .await,
        50
    );
    browser.click("#bulk button[value=delete]").await;
    browser.accept_alert().await;
    until_text(&browser, "[role=status]", "Deleted 50 tasks").await;
    assert_eq!(browser.all("#task-list tbody tr").await.len(), 5);
    assert!(matches!(
        q.get(echoes[54]).await,
        Err(harness::queue::Error::NotFound(_))
    ));
    assert!(q.get(echoes[4]).await.is_ok());

    // An agent: run it now, see its run complete and its handoff appear; pause it.
    browser.goto(&format!("{base}/agents")).await;
    until_text(&browser, "#agent-list", "greeter").await;
    browser.click("#agent-list a[href='/agents/greeter']").await;
    until_text(&browser, "h1", "Agent greeter").await;
    browser
        .type_into("input[name=input]", r#"{"hello": 1}"#)
        .await;
    browser
        .click("form[action='/agents/greeter/run'] button")
        .await;
    until_text(&browser, "#task-fields", "completed").await;
    browser.goto(&format!("{base}/agents/greeter")).await;
    until_text(&browser, "#handoffs", "run #1").await;
    until_text(&browser, "#handoffs", "\"count\": 1").await;
    assert!(
        browser.text("#config").await.contains("sk-secret-1"),
        "an admin sees it"
    );
    // A second run: the handoff history shows what changed.
    browser
        .click("form[action='/agents/greeter/run'] button")
        .await;
    until_text(&browser, "#task-fields", "completed").await;
    browser.goto(&format!("{base}/agents/greeter")).await;
    until_text(&browser, "#handoffs", "run #2").await;
    until_text(&browser, "#handoffs", "~ /count 1 → 2").await;
    assert!(
        !browser.all("#code span.k").await.is_empty(),
        "the code is highlighted"
    );
    save(&browser, "agent").await;
    // Editing: a bad schedule is refused naming the field, keeping what was typed.
    browser.click("details.edit summary").await;
    browser
        .run(
            "document.querySelector('input[name=schedule]').value = '61 * * * *'; \
             document.querySelector('textarea[name=config]').value = '{\"name\": \"Grace\"}'; \
             return null;",
        )
        .await;
    browser.click("form.edit button").await;
    until_text(&browser, "[role=alert]", "schedule").await;
    assert_eq!(
        browser
            .run("return document.querySelector('input[name=schedule]').value;")
            .await,
        "61 * * * *"
    );
    browser
        .run("document.querySelector('input[name=schedule]').value = '*/5 * * * *'; return null;")
        .await;
    browser.click("form.edit button").await;
    until_text(&browser, "#agent-fields", "every 5 minutes").await;
    assert!(browser.text("#config").await.contains("Grace"));
    browser.goto(&format!("{base}/agents")).await;
    until_text(&browser, "#agent-list", "100% of").await;
    until_text(&browser, "#agent-list", "every 5 minutes").await;
    // Pausing from the list comes back to the list.
    browser
        .click("#agent-list form[action='/agents/broken/pause'] button")
        .await;
    until_text(&browser, "#agent-list", "paused").await;
    assert!(browser.url().await.ends_with("/agents"));
    browser.goto(&format!("{base}/agents/greeter")).await;
    browser
        .click("form[action='/agents/greeter/pause'] button")
        .await;
    until_text(&browser, "#agent-state", "paused").await;

    // The fleet: three failures hold the replica; resume it from the page.
    for _ in 0..3 {
        enqueue(&db, "command", r#"{"argv": ["false"]}"#);
    }
    browser.goto(&format!("{base}/fleet")).await;
    until_text(&browser, "#fleet-replicas", "holding").await;
    assert!(
        !browser
            .all("#fleet-replicas figure.chart polyline")
            .await
            .is_empty()
    );
    save(&browser, "fleet").await;
    browser
        .click("#fleet-replicas form[action$='/resume'] button")
        .await;
    until_text(&browser, "#fleet-replicas", "normal").await;
    assert!(browser.text("#fleet-replicas").await.contains("escalated"));
    // Its queue, served by the replica: paused and resumed fleet-wide from the page.
    until_text(&browser, "#fleet-queues", "running").await;
    browser
        .click("#fleet-queues form[action='/fleet/queues/default/pause'] button")
        .await;
    until_text(&browser, "#fleet-queues", "paused from the console").await;
    let paused: bool = sqlx::query_scalar("SELECT paused FROM queues WHERE name = 'default'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(paused);
    browser
        .click("#fleet-queues form[action='/fleet/queues/default/resume'] button")
        .await;
    until_text(&browser, "#fleet-queues", "running").await;
    let paused: bool = sqlx::query_scalar("SELECT paused FROM queues WHERE name = 'default'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!paused);

    // Keyboard: Tab reaches the pages' links, Enter follows one.
    browser.goto(&format!("{base}/")).await;
    until_text(&browser, "h1", "Overview").await;
    for _ in 0..3 {
        browser.press("\u{E004}").await;
    }
    assert_eq!(
        browser
            .run("return document.activeElement.textContent;")
            .await,
        "Tasks"
    );
    browser.press("\u{E007}").await;
    until_text(&browser, "h1", "Tasks").await;

    // A phone: no page is wider than the screen (tables scroll in their own box).
    browser.set_window(390, 844).await;
    for page in [
        "/",
        "/tasks",
        &format!("/tasks/{flaky}"),
        "/agents",
        "/agents/greeter",
        "/fleet",
    ] {
        browser.goto(&format!("{base}{page}")).await;
        browser.find("main h1").await;
        let fits = browser
            .run("return document.documentElement.scrollWidth <= window.innerWidth + 1;")
            .await;
        assert_eq!(fits, true, "{page} is wider than a phone");
    }
    browser.goto(&format!("{base}/")).await;
    browser.find("main h1").await;
    save(&browser, "phone").await;
    browser.set_window(1280, 900).await;

    let errors = browser.errors().await;
    assert!(errors.is_empty(), "the browser logged errors: {errors:?}");
}

/// Pages of a filter no index serves (a kind, a status) read a bounded window of ids below
/// where they start, and say how far they searched; time filters become id bounds.
#[tokio::test]
async fn a_filter_no_index_serves_reads_a_bounded_window_of_ids() {
    use harness::queue::NewTask;
    let db = TestDb::new().await;
    let q = Queue::new(db.pool.clone(), 0);
    let later = chrono::Utc::now() + chrono::Duration::days(365);
    let task = |kind: &str| NewTask::new(kind, json!({})).run_at(later);
    let rare: Vec<i64> = q
        .enqueue_many(vec![task("rare"); 3])
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let between = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let many = q.enqueue_many(vec![task("common"); 20_050]).await.unwrap();
    // The first task created at or after a time, by bisecting ids.
    let range = q.id_range().await.unwrap().unwrap();
    assert_eq!(range, (rare[0], many.last().unwrap().id));
    assert_eq!(
        q.first_id_since(range, between).await.unwrap(),
        Some(many[0].id)
    );
    assert_eq!(
        q.first_id_since(range, between - chrono::Duration::hours(1))
            .await
            .unwrap(),
        Some(rare[0])
    );
    assert_eq!(q.first_id_since(range, later).await.unwrap(), None);

    let port = common::free_port();
    let _replica = common::Proc::spawn(
        common::harness_at(&db.url)
            .arg("serve")
            .env("HARNESS_API__BIND", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let base = format!("http://127.0.0.1:{port}");
    let page = async |path: &str| -> String {
        common::eventually("the console", Duration::from_secs(20), async || {
            let r = reqwest::get(format!("{base}{path}")).await.ok()?;
            r.status().is_success().then_some(())?;
            r.text().await.ok()
        })
        .await
    };
    let rows = |html: &str| html.matches("href=\"/tasks/").count();
    // The rare kind is older than the window: the first page says how far it looked and
    // links on; the next one finds them.
    let first = page("/tasks?kind=rare").await;
    assert_eq!(rows(&first), 0, "{first}");
    let searched_to = many[50].id;
    assert!(
        first.contains(&format!("Searched down to task {searched_to}")),
        "{first}"
    );
    let older = format!("/tasks?kind=rare&amp;before={searched_to}");
    assert!(first.contains(&older), "{first}");
    let next = page(&older.replace("&amp;", "&")).await;
    assert_eq!(rows(&next), 3, "{next}");
    assert!(!next.contains("rel=\"next\""), "nothing older: {next}");
    // A status every task has fills its page from the window.
    let pending = page("/tasks?status=pending").await;
    assert_eq!(rows(&pending), 50);
    // A time filter: only what was created since `between`, a page of it.
    let since = between.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    let recent = page(&format!("/tasks?kind=rare&since={since}")).await;
    assert_eq!(rows(&recent), 0);
    // A bulk action: at most 500 tasks, and only with the page's form token.
    let csrf = first
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|v| v.split('"').next())
        .expect("the page's form token")
        .to_string();
    let bulk = |csrf: String, n: usize| {
        let mut form = vec![
            ("csrf".to_string(), csrf),
            ("action".into(), "cancel".into()),
        ];
        form.extend(
            many.iter()
                .take(n)
                .map(|e| ("id".to_string(), e.id.to_string())),
        );
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
            .post(format!("{base}/tasks/bulk"))
            .form(&form)
    };
    let r = bulk(csrf.clone(), 501).send().await.unwrap();
    assert_eq!(r.status(), 422);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("501 tasks selected; at most 500")
    );
    let r = bulk("not-the-token".into(), 2).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = bulk(csrf, 2).send().await.unwrap();
    assert!(r.status().is_redirection(), "{:?}", r.status());
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .contains("bulk=cancel&done=2&skipped=0"),
        "{:?}",
        r.headers()
    );
    assert_eq!(q.get(many[0].id).await.unwrap().status, Status::Cancelled);
    // The overview counts each status through its index (up to a cap of 100,000).
    let overview = page("/").await;
    // 20,053 waiting, less the two the bulk action cancelled.
    assert!(overview.contains("Queue depth 20,051"), "{overview}");
}
