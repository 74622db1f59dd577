//! OpenTelemetry export over OTLP/HTTP: a receiver in the test decodes what a real replica and
//! a real `harness enqueue` send, and the enqueue and execute spans share one trace.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestDb;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tokio::io::AsyncWriteExt;

#[derive(Default)]
struct Received {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
}

/// A minimal OTLP/HTTP receiver (keep-alive aware).
async fn receiver() -> (u16, Arc<Mutex<Received>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Received::default()));
    let store = got.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let mut buf: Vec<u8> = Vec::new();
                while let Some((head, body)) = common::read_http_request(&mut sock, &mut buf).await
                {
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    {
                        let mut g = store.lock().unwrap();
                        if path.ends_with("/v1/traces") {
                            if let Ok(r) = ExportTraceServiceRequest::decode(body.as_slice()) {
                                g.traces.push(r);
                            }
                        } else if path.ends_with("/v1/metrics")
                            && let Ok(r) = ExportMetricsServiceRequest::decode(body.as_slice())
                        {
                            g.metrics.push(r);
                        }
                    }
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    (port, got)
}

fn harness(db: &TestDb, port: u16) -> Command {
    let mut cmd = common::harness_command();
    cmd.env("DATABASE_URL", &db.url)
        .env("HARNESS_BULK__POLL_INTERVAL_MS", "100")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .env("OTEL_SERVICE_NAME", "harness-test")
        .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "500")
        .env("RUST_LOG", "info");
    cmd
}

/// A span received: name, trace id, resource attributes.
/// A span received: name, trace id, resource attributes, span id, parent span id.
type Span = (String, Vec<u8>, Vec<(String, String)>, Vec<u8>, Vec<u8>);

fn spans(got: &Received) -> Vec<Span> {
    let mut out = Vec::new();
    for req in &got.traces {
        for rs in &req.resource_spans {
            let attrs: Vec<(String, String)> = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .map(|kv| (kv.key.clone(), format!("{:?}", kv.value)))
                .collect();
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push((
                        s.name.clone(),
                        s.trace_id.clone(),
                        attrs.clone(),
                        s.span_id.clone(),
                        s.parent_span_id.clone(),
                    ));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn enqueue_and_execute_spans_share_a_trace_and_metrics_arrive() {
    let db = TestDb::new().await;
    let (port, got) = receiver().await;
    let replica = common::Proc::spawn(
        harness(&db, port)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );

    let out = harness(&db, port)
        .args(["enqueue", "echo", r#"{"traced": true}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (enqueue, execute) = common::eventually(
        "the enqueue and execute spans",
        Duration::from_secs(30),
        async || {
            let all = spans(&got.lock().unwrap());
            let enq = all.iter().find(|s| s.0 == "queue.enqueue").cloned();
            let exe = all.iter().find(|s| s.0 == "task.execute").cloned();
            enq.zip(exe)
        },
    )
    .await;
    assert_eq!(execute.1, enqueue.1, "one trace");
    assert_eq!(
        execute.4, enqueue.3,
        "the execution span's parent is the enqueue span"
    );
    let attrs = &execute.2;
    let has = |k: &str, v: &str| attrs.iter().any(|(a, b)| a == k && b.contains(v));
    assert!(has("service.name", "harness-test"), "{attrs:?}");
    assert!(has("deployment.environment", "test"), "{attrs:?}");
    assert!(
        attrs.iter().any(|(a, _)| a == "service.instance.id"),
        "{attrs:?}"
    );
    assert!(attrs.iter().any(|(a, _)| a == "host.name"), "{attrs:?}");

    // The task metrics arrive over OTLP too.
    let t0 = Instant::now();
    loop {
        let names: Vec<String> = got
            .lock()
            .unwrap()
            .metrics
            .iter()
            .flat_map(|r| r.resource_metrics.iter())
            .flat_map(|rm| rm.scope_metrics.iter())
            .flat_map(|sm| sm.metrics.iter())
            .map(|m| m.name.clone())
            .collect();
        if names.iter().any(|n| n == "harness.tasks.completed")
            && names.iter().any(|n| n == "harness.task.duration")
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "metrics received: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(replica);
}
