//! Logging, traces and metrics.
//!
//! - Logs go to stderr: human-readable on a terminal, JSON lines otherwise
//!   (`telemetry.log_format: auto|json|pretty`); `RUST_LOG` filters them (default `info`).
//! - Traces and metrics are exported over OTLP/HTTP (protobuf) when the standard variables ask
//!   for it (`OTEL_EXPORTER_OTLP_ENDPOINT`, or the `_TRACES_`/`_METRICS_` variants; also
//!   `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SDK_DISABLED`). These are read by the
//!   OpenTelemetry SDK itself; nothing is exported and nothing fails when they are unset.
//! - `/metrics` and OTLP come from one meter provider ([`metrics`]).
//! - Trace context crosses the queue: the enqueuing span's W3C `traceparent` is stored with the
//!   task ([`current_traceparent`]) and the execution span is its child ([`parent_from`]).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

use crate::config::LogFormat;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether OTLP export of (traces, metrics) is asked for by the standard variables.
pub fn otlp_wanted() -> (bool, bool) {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return (false, false);
    }
    let any = env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    (
        any || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some(),
        any || env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").is_some(),
    )
}

static RESOURCE: std::sync::OnceLock<opentelemetry_sdk::Resource> = std::sync::OnceLock::new();

/// service.name (OTEL_SERVICE_NAME, else agent-harness), service.version, service.instance.id
/// (the replica id), host.name, k8s.pod.name and k8s.namespace.name (POD_NAME,
/// POD_NAMESPACE from the downward API), and OTEL_RESOURCE_ATTRIBUTES.
fn resource(instance_id: Option<&str>) -> opentelemetry_sdk::Resource {
    use opentelemetry::KeyValue;
    let mut b = opentelemetry_sdk::Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        b = b.with_service_name("agent-harness");
    }
    let mut attrs = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
    if let Some(id) = instance_id {
        attrs.push(KeyValue::new("service.instance.id", id.to_string()));
    }
    if let Some(host) = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
    {
        attrs.push(KeyValue::new("host.name", host));
    }
    if let Some(pod) = env("POD_NAME") {
        attrs.push(KeyValue::new("k8s.pod.name", pod));
    }
    if let Some(ns) = env("POD_NAMESPACE") {
        attrs.push(KeyValue::new("k8s.namespace.name", ns));
    }
    b.with_attributes(attrs).build()
}

/// What must be flushed before the process exits.
pub struct Telemetry {
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporters (spans and metrics not yet sent go now).
    pub fn shutdown(&self) {
        if let Some(t) = &self.tracer {
            let _ = t.shutdown();
        }
        if let Some(m) = METRICS.get() {
            let _ = m.provider.shutdown();
        }
    }
}

/// What a replica logs unless `RUST_LOG` says otherwise.
pub const REPLICA_LOG_FILTER: &str = "info,sqlx=warn";

/// Installs the global subscriber (logs, and spans over OTLP when asked for). `instance_id`
/// is the replica id, for the `service.instance.id` resource attribute; `default_filter`
/// applies when `RUST_LOG` is not set. Calling it twice is harmless (the second call installs
/// nothing).
pub fn init(format: LogFormat, instance_id: Option<&str>, default_filter: &str) -> Telemetry {
    let _ = RESOURCE.set(resource(instance_id));
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let tracer = if otlp_wanted().0 {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => Some(
                opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        RESOURCE
                            .get()
                            .cloned()
                            .unwrap_or_else(|| resource(instance_id)),
                    )
                    .build(),
            ),
            Err(e) => {
                eprintln!("warning: OTLP trace export is configured but cannot start: {e}");
                None
            }
        }
    } else {
        None
    };
    if tracer.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
    }
    let otel = tracer.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider;
        tracing_opentelemetry::layer().with_tracer(p.tracer("harness"))
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    let _ = result;
    Telemetry { tracer }
}

/// The W3C `traceparent` of the current span, when it is being traced.
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The remote parent named by a `traceparent`, to make a span its child.
pub fn parent_from(traceparent: &str) -> Option<opentelemetry::Context> {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    let carrier =
        std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The process's metrics: one OpenTelemetry meter provider whose Prometheus exporter renders
/// `/metrics`. Instruments use OpenTelemetry names and units (`harness.tasks.enqueued`,
/// `{task}`, `s`); the exporter turns them into Prometheus names
/// (`harness_tasks_enqueued_total`, `harness_task_duration_seconds`).
pub struct Metrics {
    registry: prometheus::Registry,
    provider: opentelemetry_sdk::metrics::SdkMeterProvider,
    pub enqueued: opentelemetry::metrics::Counter<u64>,
    pub completed: opentelemetry::metrics::Counter<u64>,
    pub failed: opentelemetry::metrics::Counter<u64>,
    pub retried: opentelemetry::metrics::Counter<u64>,
    pub duration: opentelemetry::metrics::Histogram<f64>,
    pub pickup_latency: opentelemetry::metrics::Histogram<f64>,
    pub queue_depth: opentelemetry::metrics::Gauge<i64>,
    pub queue_due: opentelemetry::metrics::Gauge<i64>,
    pub queue_runnable: opentelemetry::metrics::Gauge<i64>,
    pub limit_waiting: opentelemetry::metrics::Gauge<i64>,
    pub queue_delayed: opentelemetry::metrics::Gauge<i64>,
    pub oldest_due_age: opentelemetry::metrics::Gauge<f64>,
    pub database_up: opentelemetry::metrics::Gauge<i64>,
    pub oom_kills: opentelemetry::metrics::Counter<u64>,
    pub capacity: opentelemetry::metrics::Gauge<i64>,
    pub running: opentelemetry::metrics::Gauge<i64>,
    pub governor_state: opentelemetry::metrics::Gauge<i64>,
    pub leader: opentelemetry::metrics::Gauge<i64>,
    pub cpu: opentelemetry::metrics::Gauge<f64>,
    pub memory: opentelemetry::metrics::Gauge<f64>,
}

static METRICS: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();

/// The process's metrics (created on first use). A table of instruments, one builder each,
/// so it stays whole: its length is the number of metrics, not steps of logic.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| {
        use opentelemetry::metrics::MeterProvider;
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .build()
            .expect("the Prometheus exporter builds");
        let mut builder = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_reader(exporter)
            .with_resource(RESOURCE.get().cloned().unwrap_or_else(|| resource(None)));
        if otlp_wanted().1 {
            match opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .build()
            {
                // Interval from OTEL_METRIC_EXPORT_INTERVAL (default 60 s).
                Ok(exporter) => {
                    builder = builder.with_reader(
                        opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build(),
                    )
                }
                Err(e) => {
                    eprintln!("warning: OTLP metric export is configured but cannot start: {e}")
                }
            }
        }
        let provider = builder.build();
        let m = provider.meter("harness");
        // Up to a day: agent runs may last 24 h (the timeout's bound).
        let seconds = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
        ];
        Metrics {
            enqueued: m
                .u64_counter("harness.tasks.enqueued")
                .with_unit("{task}")
                .with_description("Tasks enqueued")
                .build(),
            completed: m
                .u64_counter("harness.tasks.completed")
                .with_unit("{task}")
                .with_description("Task attempts that succeeded")
                .build(),
            failed: m
                .u64_counter("harness.tasks.failed")
                .with_unit("{task}")
                .with_description("Task attempts that failed or timed out")
                .build(),
            retried: m
                .u64_counter("harness.tasks.retried")
                .with_unit("{task}")
                .with_description("Task retries scheduled")
                .build(),
            duration: m
                .f64_histogram("harness.task.duration")
                .with_unit("s")
                .with_description("Run time of a task attempt")
                .with_boundaries(seconds.to_vec())
                .build(),
            pickup_latency: m
                .f64_histogram("harness.task.pickup_latency")
                .with_unit("s")
                .with_description("Time from a task being due to its claim")
                .with_boundaries(seconds.to_vec())
                .build(),
            queue_depth: m
                .i64_gauge("harness.queue.depth")
                .with_unit("{task}")
                .with_description("Tasks by status (completed excluded)")
                .build(),
            queue_due: m
                .i64_gauge("harness.queue.due")
                .with_unit("{task}")
                .with_description("Waiting tasks that are due now (pending or retry_scheduled)")
                .build(),
            queue_runnable: m
                .i64_gauge("harness.queue.runnable")
                .with_unit("{task}")
                .with_description("Tasks due now in each named queue (label `queue`)")
                .build(),
            limit_waiting: m
                .i64_gauge("harness.limit.waiting")
                .with_unit("{task}")
                .with_description(
                    "Due tasks a full limit holds back now (labels `scope`, `target`), 0 while it is not full",
                )
                .build(),
            queue_delayed: m
                .i64_gauge("harness.queue.delayed")
                .with_unit("{task}")
                .with_description("Waiting tasks scheduled for later (delayed, backing off)")
                .build(),
            oldest_due_age: m
                .f64_gauge("harness.queue.oldest_due_age")
                .with_unit("s")
                .with_description("How long the oldest due task has waited since it became due")
                .build(),
            database_up: m
                .i64_gauge("harness.database.up")
                .with_description("1 when the replica's last query of the queue succeeded, else 0")
                .build(),
            oom_kills: m
                .u64_counter("harness.agent.oom_kills")
                .with_unit("{run}")
                .with_description("Runs ended by their memory cgroup's OOM killer")
                .build(),
            capacity: m
                .i64_gauge("harness.pool.capacity")
                .with_unit("{task}")
                .with_description("Tasks the governor lets this replica run at once")
                .build(),
            running: m
                .i64_gauge("harness.pool.running")
                .with_unit("{task}")
                .with_description("Tasks running on this replica")
                .build(),
            governor_state: m
                .i64_gauge("harness.governor.state")
                .with_description("0 normal, 1 throttled, 2 paused, 3 holding")
                .build(),
            leader: m
                .i64_gauge("harness.scheduler.leader")
                .with_description("1 while this replica is the scheduler leader")
                .build(),
            cpu: m
                .f64_gauge("harness.host.cpu.utilization")
                .with_unit("%")
                .with_description("CPU use as the governor sampled it")
                .build(),
            memory: m
                .f64_gauge("harness.host.memory.utilization")
                .with_unit("%")
                .with_description("Memory use as the governor sampled it")
                .build(),
            registry,
            provider,
        }
    })
}

impl Metrics {
    /// The Prometheus text exposition of every instrument.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Distinct `kind` label values one process exports; later ones are counted as `other`.
pub const MAX_KIND_LABELS: usize = 100;
/// Distinct `agent_id` label values one process exports; later ones are counted as `other`.
pub const MAX_AGENT_LABELS: usize = 200;

/// A label whose values come from users (kinds, agents): the first `max` distinct values are
/// exported as themselves, the rest as `other`, so a fleet with many agents (or a client
/// enqueueing made-up kinds through the library) cannot grow the series without bound.
struct LabelBudget {
    max: usize,
    seen: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl LabelBudget {
    const fn new(max: usize) -> LabelBudget {
        LabelBudget {
            max,
            seen: std::sync::Mutex::new(std::collections::BTreeSet::new()),
        }
    }
    fn admit(&self, value: String) -> String {
        let mut seen = self.seen.lock().expect("label budget lock");
        if seen.contains(&value) || (seen.len() < self.max && seen.insert(value.clone())) {
            value
        } else {
            "other".to_string()
        }
    }
}

static KINDS: LabelBudget = LabelBudget::new(MAX_KIND_LABELS);
static AGENTS: LabelBudget = LabelBudget::new(MAX_AGENT_LABELS);

/// `kind` as a metric attribute.
pub fn kind(kind: &str) -> [opentelemetry::KeyValue; 1] {
    [opentelemetry::KeyValue::new(
        "kind",
        KINDS.admit(kind.to_string()),
    )]
}

/// `kind`, and `agent_id` for an agent's runs, as metric attributes (each bounded: see
/// [`MAX_KIND_LABELS`], [`MAX_AGENT_LABELS`]).
pub fn task_attrs(kind: &str, agent_id: Option<i64>) -> Vec<opentelemetry::KeyValue> {
    let mut v = vec![opentelemetry::KeyValue::new(
        "kind",
        KINDS.admit(kind.to_string()),
    )];
    if let Some(a) = agent_id {
        v.push(opentelemetry::KeyValue::new(
            "agent_id",
            AGENTS.admit(a.to_string()),
        ));
    }
    v
}

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn a_label_keeps_its_first_values_and_folds_the_rest_into_other() {
        let b = LabelBudget::new(2);
        assert_eq!(b.admit("a".into()), "a");
        assert_eq!(b.admit("b".into()), "b");
        assert_eq!(b.admit("c".into()), "other");
        assert_eq!(b.admit("a".into()), "a", "a known value stays itself");
    }
}
