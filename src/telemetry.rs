//! Logging and, as the crate grows, tracing export and metrics.
//!
//! Logs go to stderr: human-readable on a terminal, JSON lines otherwise
//! (`telemetry.log_format: auto|json|pretty`); `RUST_LOG` filters them (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

use crate::config::LogFormat;

/// Installs the global subscriber. Calling it twice is harmless (the second call is ignored).
pub fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
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
    pub capacity: opentelemetry::metrics::Gauge<i64>,
    pub running: opentelemetry::metrics::Gauge<i64>,
    pub governor_state: opentelemetry::metrics::Gauge<i64>,
    pub leader: opentelemetry::metrics::Gauge<i64>,
    pub cpu: opentelemetry::metrics::Gauge<f64>,
    pub memory: opentelemetry::metrics::Gauge<f64>,
}

static METRICS: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();

/// The process's metrics (created on first use).
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| {
        use opentelemetry::metrics::MeterProvider;
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .build()
            .expect("the Prometheus exporter builds");
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_reader(exporter)
            .build();
        let m = provider.meter("harness");
        let seconds = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 300.0,
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

    pub fn provider(&self) -> &opentelemetry_sdk::metrics::SdkMeterProvider {
        &self.provider
    }
}

/// `kind` as a metric attribute.
pub fn kind(kind: &str) -> [opentelemetry::KeyValue; 1] {
    [opentelemetry::KeyValue::new("kind", kind.to_string())]
}
