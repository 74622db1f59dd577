//! `/metrics` of a real replica, with every instrument exercised, against every metric name
//! the shipped dashboard, the alert rules and the README use.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::TestDb;
use serde_json::json;

/// Metric names in Prometheus expressions and prose: `harness_` and lower-case words.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("harness_") {
        let start = i + pos;
        let mut end = start + "harness_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        // Not part of a longer identifier (e.g. `pg_harness_x`) and not a NOTIFY channel.
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let name = &text[start..end];
        if before_ok && !["harness_agents", "harness_tasks", "harness_cancel"].contains(&name) {
            out.insert(name.to_string());
        }
        i = end;
    }
    out
}

/// The README's list of metrics: the `/metrics` bullet of the API section.
fn readme_metrics(readme: &str) -> String {
    let start = readme
        .find("- `/metrics`: ")
        .expect("the README lists the metrics");
    let rest = &readme[start..];
    let end = rest[2..].find("\n- ").map_or(rest.len(), |e| e + 2);
    let end = end.min(rest.find("\n\n").unwrap_or(rest.len()));
    rest[..end].to_string()
}

fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn every_metric_the_dashboard_alerts_and_readme_name_is_exported() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let mut wanted: Vec<(String, &str)> = Vec::new();
    for (file, text) in [
        (
            "deploy/grafana/harness.json",
            read("deploy/grafana/harness.json"),
        ),
        (
            "deploy/prometheus/alerts.yaml",
            read("deploy/prometheus/alerts.yaml"),
        ),
        (
            "helm/harness/files/alerts.yaml",
            read("helm/harness/files/alerts.yaml"),
        ),
        ("README.md", readme_metrics(&read("README.md"))),
    ] {
        for n in names_in(&text) {
            wanted.push((n, file));
        }
    }
    assert!(wanted.len() > 10, "{wanted:?}");

    let db = TestDb::new().await;
    let port = common::free_port();
    let _replica = common::Proc::spawn(
        common::harness_at(&db.url)
            .arg("serve")
            .env("HARNESS_API__BIND", format!("127.0.0.1:{port}"))
            .env("HARNESS_TELEMETRY__LOG_INTERVAL_S", "1")
            .env("HARNESS_BULK__POLL_INTERVAL_MS", "50")
            .env("HARNESS_BULK__RETRY_DELAY_SECONDS", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    // Every instrument: enqueue, success, failure with a retry, durations and pick-up, and
    // the governor's and scheduler's gauges (they record on their own).
    // Enqueued through the replica's API, so that its counter moves.
    let client = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{port}/api/tasks");
    let deadline = Instant::now() + Duration::from_secs(20);
    for body in [
        json!({"kind": "echo", "payload": {"x": 1}}),
        json!({"kind": "command", "payload": {"argv": ["sh", "-c", "exit 1"]}, "max_retries": 1}),
        json!({"kind": "noop", "delay_s": 3600}),
    ] {
        loop {
            match client.post(&api).json(&body).send().await {
                Ok(r) if r.status().is_success() => break,
                _ => {
                    assert!(Instant::now() < deadline, "the API never came up");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    // A limit, so that the gauge of what limits hold back is reported.
    let r = client
        .put(format!("http://127.0.0.1:{port}/api/limits/kind/noop"))
        .json(&json!({"concurrency": 1}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());

    let url = format!("http://127.0.0.1:{port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut missing: Vec<(String, &str)>;
    loop {
        let text = match client.get(&url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let have = exported(&text);
        // A histogram is named by its family; the exposition has its _bucket, _sum, _count.
        let has = |n: &str| have.contains(n) || have.contains(&format!("{n}_count"));
        missing = wanted.iter().filter(|(n, _)| !has(n)).cloned().collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "named but not exported: {missing:?}\nexported: {have:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The noop delayed an hour is delayed, not due; the database answers.
    common::eventually("the waiting gauges", Duration::from_secs(30), async || {
        let text = client.get(&url).send().await.ok()?.text().await.ok()?;
        let value = |name: &str| -> Option<f64> {
            text.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        };
        // Labelled as the README says: by queue, and by the limit's scope and target.
        let labelled = |name: &str, labels: &[&str]| {
            text.lines().any(|l| {
                l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x))
            })
        };
        (labelled("harness_queue_runnable", &["queue=\"default\""])
            && labelled(
                "harness_limit_waiting",
                &["scope=\"kind\"", "target=\"noop\""],
            )
            && value("harness_queue_delayed")? >= 1.0
            && value("harness_queue_due")? == 0.0
            && value("harness_queue_oldest_due_age_seconds")? == 0.0
            && value("harness_database_up")? == 1.0)
            .then_some(())
    })
    .await;
}
