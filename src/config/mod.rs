//! Settings: what every key means, its default and its allowed range ([`Config`]), loaded
//! in layers: built-in defaults < YAML file < environment (the merging is `layers`).
//!
//! The file is `--config PATH`, else `$HARNESS_CONFIG`, else `./harness.yml` when present.
//! Every key can be overridden with `HARNESS_<SECTION>__<KEY>` (nested sections joined by
//! `__`, e.g. `HARNESS_GOVERNANCE__PAUSE_AFTER_ERROR_BURST__THRESHOLD=5`); `DATABASE_URL`
//! sets `database.url` and `HARNESS_HOME` sets `home`.
//!
//! Guarantees: an unknown key, a value of the wrong type or a value out of range is an
//! [`Error`] that names the key, where it came from (file or variable) and what is allowed.
//! Secrets (database password, API tokens, webhook URL) never appear in `Debug` output or in
//! [`Config::to_redacted_yaml`].
//!
//! This is the only module that reads the process environment for settings.
//!
//! ```
//! let cfg = harness::config::Config::load_from(
//!     None,
//!     [("HARNESS_BULK__MAX_CONCURRENT".to_string(), "4".to_string())],
//! ).unwrap();
//! assert_eq!(cfg.bulk.max_concurrent, 4);
//! assert_eq!(cfg.bulk.retry_attempts, 3);
//! ```

mod layers;
mod secret;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use layers::Layers;
pub use layers::Origin;
pub use secret::{Secret, redact_url};

/// A configuration problem, phrased for the person who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("unknown key `{key}` ({origin}); {hint}")]
    UnknownKey {
        key: String,
        origin: Origin,
        hint: String,
    },
    #[error("invalid value for `{key}` ({origin}): {message}")]
    Invalid {
        key: String,
        origin: Origin,
        message: String,
    },
}

/// The effective configuration of one `harness` process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the private PostgreSQL and local state (`$HARNESS_HOME`).
    pub home: PathBuf,
    pub database: DatabaseConfig,
    pub bulk: BulkConfig,
    pub governance: GovernanceConfig,
    pub telemetry: TelemetryConfig,
    pub persistence: PersistenceConfig,
    pub escalation: EscalationConfig,
    pub api: ApiConfig,
    pub executor: ExecutorConfig,
    pub scheduler: SchedulerConfig,
    pub worker: WorkerConfig,
}

/// The work a replica takes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// The queues this replica serves, each with the tasks it runs of it at once:
    /// `{default: 8, heavy: 1}`. Empty: the `default` queue with `bulk.max_concurrent`.
    pub queues: BTreeMap<String, u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            home: PathBuf::from(".harness"),
            database: DatabaseConfig::default(),
            bulk: BulkConfig::default(),
            governance: GovernanceConfig::default(),
            telemetry: TelemetryConfig::default(),
            persistence: PersistenceConfig::default(),
            escalation: EscalationConfig::default(),
            api: ApiConfig::default(),
            executor: ExecutorConfig::default(),
            scheduler: SchedulerConfig::default(),
            worker: WorkerConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://…`; unset means "start a private server under `home`".
    pub url: Option<Secret>,
    /// `postgres://…` to the same database for what needs a session of its own (the `LISTEN`
    /// connections, the scheduler's leader lock, the heartbeat, migrations): PostgreSQL
    /// itself or a pooler in session mode, when `url` goes through a pooler in transaction
    /// mode. Unset: `url`.
    pub session_url: Option<Secret>,
    pub max_connections: u32,
    /// Where to find `initdb`/`postgres` for the private server; unset means search.
    pub pg_bindir: Option<PathBuf>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            session_url: None,
            max_connections: 10,
            pg_bindir: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BulkConfig {
    /// Tasks one replica runs at once (its worker pool's capacity before the governor).
    pub max_concurrent: u32,
    /// Default retries of a task after its first attempt.
    pub retry_attempts: u32,
    /// Base of the exponential retry backoff.
    pub retry_delay_seconds: u64,
    /// How often an idle replica looks for delayed tasks and lost wake-ups.
    pub poll_interval_ms: u64,
    /// How long running tasks may finish after SIGTERM before they are handed back.
    pub shutdown_grace_s: u64,
    /// The most claimed tasks a replica keeps waiting for a free slot, beyond those running,
    /// so that claims overlap execution. Used only while tasks end quickly (see
    /// [`crate::worker::PREFETCH_HORIZON`]).
    pub prefetch: u32,
}

impl Default for BulkConfig {
    fn default() -> Self {
        BulkConfig {
            max_concurrent: 8,
            retry_attempts: 3,
            retry_delay_seconds: 15,
            poll_interval_ms: 1000,
            shutdown_grace_s: 30,
            prefetch: 500,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GovernanceConfig {
    pub cpu_high_pct: f64,
    pub mem_high_pct: f64,
    pub window_s: u64,
    pub pause_after_error_burst: ErrorBurstConfig,
    pub human_review_after_pause_bursts: u32,
}

impl Default for GovernanceConfig {
    fn default() -> Self {
        GovernanceConfig {
            cpu_high_pct: 85.0,
            mem_high_pct: 85.0,
            window_s: 30,
            pause_after_error_burst: ErrorBurstConfig::default(),
            human_review_after_pause_bursts: 3,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorBurstConfig {
    pub threshold: u32,
    pub duration_s: u64,
    /// A burst with at least this share of its failures from one agent (or kind)
    /// quarantines that agent fleet-wide instead of pausing the replica; 0 never does.
    pub quarantine_share: f64,
}

impl Default for ErrorBurstConfig {
    fn default() -> Self {
        ErrorBurstConfig {
            threshold: 10,
            duration_s: 60,
            quarantine_share: 0.8,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON lines otherwise.
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub sample_interval_s: u64,
    pub log_interval_s: u64,
    pub log_format: LogFormat,
    /// Rows of `metrics` and `governance_events` older than this are pruned.
    pub retention_days: u32,
    /// Where `metrics.jsonl` and `agent.jsonl` are written.
    pub logs_dir: PathBuf,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            sample_interval_s: 2,
            log_interval_s: 10,
            log_format: LogFormat::Auto,
            retention_days: 7,
            logs_dir: PathBuf::from("logs"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersistenceConfig {
    pub gc_completed_after_days: u32,
    /// Tasks of a replica whose heartbeat is older than this go back to the queue.
    pub rescue_after_s: u64,
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        PersistenceConfig {
            gc_completed_after_days: 7,
            rescue_after_s: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EscalationConfig {
    pub enabled: bool,
    pub webhook_url: Option<Secret>,
    pub email_to: Option<String>,
    /// `smtps://user:pass@host:465` (TLS), `smtp://…:587?tls=required` (STARTTLS) or
    /// `smtp://relay:25` (plain); the e-mail goes only when set.
    pub smtp_url: Option<Secret>,
    pub email_from: String,
    /// Hosts the webhook may reach over plain http or at internal addresses.
    pub allow_hosts: Vec<String>,
}

impl Default for EscalationConfig {
    fn default() -> Self {
        EscalationConfig {
            enabled: false,
            webhook_url: None,
            email_to: None,
            smtp_url: None,
            email_from: "agent-harness@localhost".to_string(),
            allow_hosts: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Admin,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    pub token: Secret,
    pub scope: Scope,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub bind: SocketAddr,
    pub tokens: Vec<ApiToken>,
    /// Largest request body accepted, KiB (413 beyond).
    pub max_body_kb: u64,
    /// A request taking longer is answered 408.
    pub request_timeout_s: u64,
    /// Requests handled at once by one replica; more wait. `/healthz` and `/readyz` are
    /// outside this limit, and a request counts only once its body has arrived.
    pub max_concurrent_requests: usize,
    /// Open connections at most; beyond it the connection that has waited longest without
    /// sending a request (or a whole body) is closed to make room.
    pub max_connections: usize,
    /// A connection must send a whole request head within this many seconds (also while idle
    /// between requests).
    pub header_timeout_s: u64,
    /// A request must send its whole body within this many seconds (408 otherwise).
    pub body_timeout_s: u64,
    /// Require a token (read scope is enough) for `/metrics` when `tokens` is set.
    pub metrics_auth: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tokens: Vec::new(),
            max_body_kb: 1024,
            request_timeout_s: 30,
            max_concurrent_requests: 256,
            max_connections: 4096,
            header_timeout_s: 10,
            body_timeout_s: 10,
            metrics_auth: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorConfig {
    pub python: String,
    pub default_timeout_s: u64,
    pub max_memory_mb: u64,
    pub max_cpu_percent: u32,
    /// The account agents run as when the harness runs as root.
    pub run_as: String,
    /// After SIGTERM on timeout, how long before SIGKILL.
    pub kill_grace_s: u64,
    /// stdout and stderr are each kept up to this many KiB.
    pub output_limit_kb: u64,
    /// Processes an agent may run at once (RLIMIT_NPROC), a fork bomb's ceiling.
    pub max_processes: u64,
    /// Largest file an agent may write, MB (RLIMIT_FSIZE).
    pub max_file_mb: u64,
    /// When the harness does not run as root, agents run as its own user: `serve` refuses to
    /// start unless this says the operator accepts that (`up` and `exec` warn and go on).
    pub allow_shared_user: bool,
    /// As root, each concurrent run gets a uid (and gid) of its own from this block,
    /// `FIRST-LAST`; empty: every run as `run_as`.
    pub uid_range: String,
    /// Use the host's cgroups (a memory limit per run, a process ceiling, a CPU rate, a kill
    /// that reaches escapees) where the harness can; false: rlimits only.
    pub cgroups: bool,
    /// Set `favordynmods` on the host's cgroup v2 mount when it is not set: a run's move into
    /// its cgroup then costs microseconds instead of an RCU grace period (~13 ms), at a small
    /// cost to every fork and exit on the host.
    pub cgroup_favordynmods: bool,
    /// As root, give each run private /tmp, /var/tmp, /dev/shm and /run/lock (tmpfs in a
    /// mount namespace); false: the host's, with what a run uid left there removed at its end.
    pub private_tmp: bool,
    /// Size of each private tmpfs a run gets on /tmp, /var/tmp, /dev/shm and /run/lock, MB
    /// (its pages count against the run's memory limit).
    pub tmp_mb: u64,
    /// Fork Python runs from a warm interpreter (one per replica, started on the first run)
    /// that has loaded the runner, json and asyncio, instead of starting an interpreter per
    /// run; each child isolates itself as an exec'd run would before the agent's code loads.
    /// Runs with their own environment (`requirements`), or whose `env` sets what an
    /// interpreter reads only as it starts (`PYTHON*`, the locale, `TZ`, `HOME`), start their
    /// own interpreter either way.
    pub fork_server: bool,
}

impl ExecutorConfig {
    /// The parsed `uid_range` (none when empty).
    pub fn uid_range(
        &self,
    ) -> Result<Option<crate::executor::uids::UidRange>, crate::executor::Error> {
        let s = self.uid_range.trim();
        if s.is_empty() {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(crate::executor::Error::UidRange)
    }
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            python: "python3".to_string(),
            default_timeout_s: 300,
            max_memory_mb: 256,
            max_cpu_percent: 50,
            run_as: "nobody".to_string(),
            kill_grace_s: 2,
            output_limit_kb: 256,
            max_processes: 64,
            max_file_mb: 1024,
            allow_shared_user: false,
            uid_range: "200000-200999".to_string(),
            cgroups: true,
            cgroup_favordynmods: true,
            private_tmp: true,
            tmp_mb: 64,
            fork_server: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// What the leader's advisory lock key is derived from. Only the election is namespaced
    /// (agents, tasks and replicas are not): a deployment needs a database of its own.
    pub namespace: String,
    /// How often a replica that is not the leader tries to become it.
    pub elect_interval_s: u64,
    /// Missed ticks younger than this are coalesced into one run; older ones are skipped.
    pub misfire_grace_s: u64,
    /// The server ends a leader's session idle this long (a hung or stopped leader).
    pub idle_session_timeout_s: u64,
    /// How often the leader re-reads every agent, on top of change notifications.
    pub reconcile_interval_s: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            namespace: "harness".to_string(),
            elect_interval_s: 2,
            misfire_grace_s: 60,
            idle_session_timeout_s: 10,
            reconcile_interval_s: 5,
        }
    }
}
impl Config {
    /// The queues this replica serves with their capacities (`worker.queues`, or the
    /// `default` queue with `bulk.max_concurrent`).
    pub fn queues(&self) -> Vec<(String, usize)> {
        if self.worker.queues.is_empty() {
            return vec![(
                crate::queue::DEFAULT_QUEUE.to_string(),
                self.bulk.max_concurrent as usize,
            )];
        }
        self.worker
            .queues
            .iter()
            .map(|(q, n)| (q.clone(), *n as usize))
            .collect()
    }

    /// The tasks this replica runs at once before the governor: the sum of its queues'.
    pub fn slots(&self) -> usize {
        self.queues().iter().map(|(_, n)| n).sum()
    }

    /// Loads from the process environment and the chosen file.
    pub fn load(explicit_file: Option<&Path>) -> Result<Config, Error> {
        Self::load_from(explicit_file, std::env::vars())
    }

    /// Loads with an explicit environment (tests pass their own): defaults, then the file,
    /// then the environment, each value remembered with its origin for the errors.
    pub fn load_from(
        explicit_file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Error> {
        let env: BTreeMap<String, String> = env.into_iter().collect();
        let mut layers =
            Layers::new(serde_norway::to_value(Config::default()).expect("defaults serialize"));
        if let Some(path) = layers::choose_file(explicit_file, &env) {
            layers.add_file(&path)?;
        }
        layers.add_env(&env)?;
        let cfg: Config = serde_path_to_error::deserialize(layers.merged()).map_err(|e| {
            let key = e.path().to_string();
            let mut message = e.into_inner().to_string();
            if secret::is_secret_key(&key) {
                // The value may be the secret itself (a token list that is not valid JSON).
                message = secret::without_quoted_values(&message);
                if key == "api.tokens" {
                    message.push_str(
                        r#"; give a JSON list like [{"token":"at least 16 characters","scope":"admin"}]"#,
                    );
                }
            }
            Error::Invalid {
                origin: layers.origin_of(&key),
                message,
                key,
            }
        })?;
        cfg.validate().map_err(|(key, message)| Error::Invalid {
            origin: layers.origin_of(&key),
            key,
            message,
        })?;
        Ok(cfg)
    }

    /// Range checks that types alone cannot express. Returns `(key, what is allowed)`.
    fn validate(&self) -> Result<(), (String, String)> {
        for (key, v, lo, hi) in self.ranges() {
            if !(lo..=hi).contains(&v) {
                return Err((
                    key.to_string(),
                    format!("{v} is out of range; allowed {lo} to {hi}"),
                ));
            }
        }
        if self.persistence.rescue_after_s < 3 * self.telemetry.sample_interval_s {
            return Err((
                "persistence.rescue_after_s".into(),
                format!(
                    "{} is too short: it must be at least three times telemetry.sample_interval_s \
                     ({}), the heartbeat interval, or live replicas would lose their tasks",
                    self.persistence.rescue_after_s, self.telemetry.sample_interval_s
                ),
            ));
        }
        for (key, value, what) in [
            (
                "scheduler.namespace",
                &self.scheduler.namespace,
                "must not be empty",
            ),
            (
                "executor.run_as",
                &self.executor.run_as,
                "must name a user account",
            ),
            (
                "executor.python",
                &self.executor.python,
                "must name a Python interpreter",
            ),
        ] {
            if value.trim().is_empty() {
                return Err((key.into(), what.into()));
            }
        }
        for (q, n) in &self.worker.queues {
            let key = format!("worker.queues.{q}");
            if let Err(reason) = crate::queue::validate_queue_name(q) {
                return Err((key, format!("names a queue that cannot exist: {reason}")));
            }
            if !(1..=crate::bounds::MAX_SLOTS).contains(n) {
                return Err((
                    key,
                    format!(
                        "{n} is out of range; a queue's capacity is 1 to {}",
                        crate::bounds::MAX_SLOTS
                    ),
                ));
            }
        }
        let slots: u64 = self.worker.queues.values().map(|n| *n as u64).sum();
        if slots > crate::bounds::MAX_SLOTS as u64 {
            return Err((
                "worker.queues".into(),
                format!(
                    "the capacities add up to {slots}; a replica runs at most {} at once",
                    crate::bounds::MAX_SLOTS
                ),
            ));
        }
        if let Err(e) = self.executor.uid_range() {
            let text = e.to_string();
            let text = text.trim_start_matches("executor.uid_range: ");
            return Err(("executor.uid_range".into(), text.to_string()));
        }
        self.validate_secrets()
    }

    /// Every numeric setting with its allowed range (checked in this order; integers are exact
    /// as `f64` at these sizes). A table, so it stays whole however long `rustfmt` makes it.
    fn ranges(&self) -> [(&'static str, f64, f64, f64); 37] {
        use crate::bounds;
        let (b, g, t, p, e, sc, a) = (
            &self.bulk,
            &self.governance,
            &self.telemetry,
            &self.persistence,
            &self.executor,
            &self.scheduler,
            &self.api,
        );
        let f = |v: u64| v as f64;
        [
            (
                "database.max_connections",
                f(self.database.max_connections.into()),
                1.0,
                1000.0,
            ),
            (
                "bulk.max_concurrent",
                f(b.max_concurrent.into()),
                1.0,
                bounds::MAX_SLOTS as f64,
            ),
            (
                "bulk.retry_attempts",
                f(b.retry_attempts.into()),
                0.0,
                f(bounds::MAX_RETRIES.into()),
            ),
            (
                "bulk.poll_interval_ms",
                f(b.poll_interval_ms),
                10.0,
                60_000.0,
            ),
            (
                "bulk.shutdown_grace_s",
                f(b.shutdown_grace_s),
                0.0,
                86_400.0,
            ),
            ("bulk.prefetch", f(b.prefetch.into()), 0.0, 10_000.0),
            (
                "persistence.rescue_after_s",
                f(p.rescue_after_s),
                3.0,
                86_400.0,
            ),
            (
                "bulk.retry_delay_seconds",
                f(b.retry_delay_seconds),
                0.0,
                86_400.0,
            ),
            ("governance.cpu_high_pct", g.cpu_high_pct, 1.0, 100.0),
            ("governance.mem_high_pct", g.mem_high_pct, 1.0, 100.0),
            ("governance.window_s", f(g.window_s), 1.0, 86_400.0),
            (
                "governance.pause_after_error_burst.threshold",
                f(g.pause_after_error_burst.threshold.into()),
                1.0,
                1_000_000.0,
            ),
            (
                "governance.pause_after_error_burst.duration_s",
                f(g.pause_after_error_burst.duration_s),
                1.0,
                86_400.0,
            ),
            (
                "governance.pause_after_error_burst.quarantine_share",
                g.pause_after_error_burst.quarantine_share,
                0.0,
                1.0,
            ),
            (
                "governance.human_review_after_pause_bursts",
                f(g.human_review_after_pause_bursts.into()),
                1.0,
                1000.0,
            ),
            (
                "telemetry.sample_interval_s",
                f(t.sample_interval_s),
                1.0,
                3600.0,
            ),
            (
                "telemetry.log_interval_s",
                f(t.log_interval_s),
                1.0,
                86_400.0,
            ),
            (
                "persistence.gc_completed_after_days",
                f(p.gc_completed_after_days.into()),
                1.0,
                36_500.0,
            ),
            (
                "executor.default_timeout_s",
                f(e.default_timeout_s),
                f(bounds::TIMEOUT_S.0),
                f(bounds::TIMEOUT_S.1),
            ),
            (
                "executor.max_memory_mb",
                f(e.max_memory_mb),
                f(bounds::MEMORY_MB.0),
                f(bounds::MEMORY_MB.1),
            ),
            ("executor.tmp_mb", f(e.tmp_mb), 1.0, 65_536.0),
            (
                "executor.max_cpu_percent",
                f(e.max_cpu_percent.into()),
                f(bounds::CPU_PERCENT.0.into()),
                f(bounds::CPU_PERCENT.1.into()),
            ),
            (
                "scheduler.elect_interval_s",
                f(sc.elect_interval_s),
                1.0,
                3600.0,
            ),
            (
                "scheduler.misfire_grace_s",
                f(sc.misfire_grace_s),
                0.0,
                86_400.0,
            ),
            (
                "scheduler.idle_session_timeout_s",
                f(sc.idle_session_timeout_s),
                3.0,
                3600.0,
            ),
            (
                "scheduler.reconcile_interval_s",
                f(sc.reconcile_interval_s),
                1.0,
                3600.0,
            ),
            ("executor.kill_grace_s", f(e.kill_grace_s), 0.0, 600.0),
            (
                "executor.output_limit_kb",
                f(e.output_limit_kb),
                1.0,
                1_048_576.0,
            ),
            ("executor.max_processes", f(e.max_processes), 1.0, 100_000.0),
            ("executor.max_file_mb", f(e.max_file_mb), 1.0, 1_048_576.0),
            (
                "telemetry.retention_days",
                f(t.retention_days.into()),
                1.0,
                3650.0,
            ),
            ("api.max_body_kb", f(a.max_body_kb), 1.0, 1_048_576.0),
            ("api.request_timeout_s", f(a.request_timeout_s), 1.0, 3600.0),
            (
                "api.max_concurrent_requests",
                a.max_concurrent_requests as f64,
                1.0,
                100_000.0,
            ),
            (
                "api.max_connections",
                a.max_connections as f64,
                16.0,
                1_000_000.0,
            ),
            ("api.header_timeout_s", f(a.header_timeout_s), 1.0, 3600.0),
            ("api.body_timeout_s", f(a.body_timeout_s), 1.0, 3600.0),
        ]
    }

    /// The URLs have the schemes their clients speak; tokens are long enough.
    fn validate_secrets(&self) -> Result<(), (String, String)> {
        let scheme_of = |url: &Secret| {
            url::Url::parse(url.expose())
                .map(|u| u.scheme().to_string())
                .ok()
        };
        let urls: [(&str, Option<&Secret>, &[&str], &str); 4] = [
            (
                "database.url",
                self.database.url.as_ref(),
                &["postgres", "postgresql"],
                "must be a URL of the form postgres://user:password@host:port/database",
            ),
            (
                "database.session_url",
                self.database.session_url.as_ref(),
                &["postgres", "postgresql"],
                "must be a URL of the form postgres://user:password@host:port/database",
            ),
            (
                "escalation.smtp_url",
                self.escalation.smtp_url.as_ref(),
                &["smtp", "smtps"],
                "must be an smtps:// or smtp:// URL, e.g. smtps://user:pass@mail:465 or \
                 smtp://user:pass@mail:587?tls=required",
            ),
            (
                "escalation.webhook_url",
                self.escalation.webhook_url.as_ref(),
                &["http", "https"],
                "must be an http:// or https:// URL",
            ),
        ];
        for (key, url, schemes, what) in urls {
            if let Some(url) = url
                && !scheme_of(url).is_some_and(|s| schemes.contains(&s.as_str()))
            {
                return Err((key.into(), what.into()));
            }
        }
        if self.database.session_url.is_some() && self.database.url.is_none() {
            return Err((
                "database.session_url".into(),
                "needs database.url as well: it is the session-capable way to the database \
                 database.url names (the private server needs neither)"
                    .into(),
            ));
        }
        for (i, t) in self.api.tokens.iter().enumerate() {
            if t.token.expose().len() < 16 {
                return Err((
                    format!("api.tokens[{i}].token"),
                    "must be at least 16 characters".into(),
                ));
            }
        }
        Ok(())
    }

    /// Where the JSON logs go: `telemetry.logs_dir`, under `home` when it is relative.
    pub fn logs_dir(&self) -> PathBuf {
        self.home.join(&self.telemetry.logs_dir)
    }

    /// The effective configuration as YAML, with every secret replaced by `[redacted]`
    /// (the database URLs keep everything but their password, so it stays useful).
    pub fn to_redacted_yaml(&self) -> String {
        let mut value = serde_norway::to_value(self).expect("config serializes");
        for (key, url) in [
            ("database.url", &self.database.url),
            ("database.session_url", &self.database.session_url),
        ] {
            if let Some(url) = url {
                layers::set_path(
                    &mut value,
                    key,
                    serde_norway::Value::String(redact_url(url.expose())),
                );
            }
        }
        serde_norway::to_string(&value).expect("value serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_norway::Value;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::Builder::new().suffix(".yml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn worker_queues_come_from_the_file_or_the_environment_and_bad_ones_are_named() {
        let c = Config::load_from(None, Vec::<(String, String)>::new()).unwrap();
        assert_eq!(c.queues(), vec![("default".to_string(), 8)]);
        assert_eq!(c.slots(), 8);
        let f = file("worker:\n  queues: {default: 8, agents: 4, heavy: 1}\n");
        let c = Config::load_from(Some(f.path()), Vec::<(String, String)>::new()).unwrap();
        assert_eq!(
            c.queues(),
            vec![
                ("agents".to_string(), 4),
                ("default".to_string(), 8),
                ("heavy".to_string(), 1)
            ]
        );
        assert_eq!(c.slots(), 13);
        // The environment replaces the file's map whole.
        let c = Config::load_from(
            Some(f.path()),
            env(&[("HARNESS_WORKER__QUEUES", "{heavy: 2}")]),
        )
        .unwrap();
        assert_eq!(c.queues(), vec![("heavy".to_string(), 2)]);
        for (text, key, says) in [
            (
                "{heavy: 0}",
                "worker.queues.heavy",
                "capacity is 1 to 10000",
            ),
            ("{\"a b\": 1}", "worker.queues.a b", "letters, digits"),
            ("{a: 6000, b: 6000}", "worker.queues", "add up to 12000"),
            ("{a: x}", "worker.queues", "invalid"),
        ] {
            let err = Config::load_from(None, env(&[("HARNESS_WORKER__QUEUES", text)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(c.bulk.max_concurrent, 8);
        assert_eq!(c.bulk.retry_attempts, 3);
        assert_eq!(c.bulk.retry_delay_seconds, 15);
        assert_eq!(c.governance.cpu_high_pct, 85.0);
        assert_eq!(c.governance.pause_after_error_burst.threshold, 10);
        assert_eq!(c.governance.pause_after_error_burst.duration_s, 60);
        assert_eq!(c.governance.human_review_after_pause_bursts, 3);
        assert_eq!(c.telemetry.sample_interval_s, 2);
        assert_eq!(c.persistence.gc_completed_after_days, 7);
        assert_eq!(c.api.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.executor.default_timeout_s, 300);
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let f = file(
            "bulk:\n  max_concurrent: 5\n  retry_attempts: 7\ngovernance:\n  pause_after_error_burst:\n    threshold: 4\n",
        );
        let c = Config::load_from(
            Some(f.path()),
            env(&[
                ("HARNESS_BULK__MAX_CONCURRENT", "2"),
                (
                    "HARNESS_GOVERNANCE__PAUSE_AFTER_ERROR_BURST__DURATION_S",
                    "9",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(c.bulk.max_concurrent, 2, "env beats file");
        assert_eq!(c.bulk.retry_attempts, 7, "file beats default");
        assert_eq!(c.bulk.retry_delay_seconds, 15, "default stays");
        assert_eq!(c.governance.pause_after_error_burst.threshold, 4);
        assert_eq!(c.governance.pause_after_error_burst.duration_s, 9);
    }

    #[test]
    fn harness_config_variable_chooses_the_file() {
        let f = file("bulk:\n  retry_attempts: 9\n");
        let c = Config::load_from(None, env(&[("HARNESS_CONFIG", f.path().to_str().unwrap())]))
            .unwrap();
        assert_eq!(c.bulk.retry_attempts, 9);
    }

    #[test]
    fn database_url_and_home_aliases() {
        let c = Config::load_from(
            None,
            env(&[
                ("DATABASE_URL", "postgres://u:pw@localhost:5432/db"),
                ("HARNESS_HOME", "/tmp/h"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.database.url.unwrap().expose(),
            "postgres://u:pw@localhost:5432/db"
        );
        assert_eq!(c.home, PathBuf::from("/tmp/h"));
    }

    #[test]
    fn unknown_file_key_names_key_file_and_suggestion() {
        let f = file("bulk:\n  max_concurent: 5\n");
        let err = Config::load_from(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`bulk.max_concurent`"), "{err}");
        assert!(err.contains(f.path().to_str().unwrap()), "{err}");
        assert!(err.contains("did you mean `bulk.max_concurrent`"), "{err}");
    }

    #[test]
    fn unknown_env_key_names_the_variable() {
        let err = Config::load_from(None, env(&[("HARNESS_BULK__NOPE", "1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`bulk.nope`"), "{err}");
        assert!(err.contains("HARNESS_BULK__NOPE"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_origin() {
        let err = Config::load_from(None, env(&[("HARNESS_BULK__MAX_CONCURRENT", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`bulk.max_concurrent`"), "{err}");
        assert!(err.contains("HARNESS_BULK__MAX_CONCURRENT"), "{err}");

        let f = file("telemetry:\n  log_format: fancy\n");
        let err = Config::load_from(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`telemetry.log_format`"), "{err}");
        assert!(err.contains("pretty"), "lists the allowed values: {err}");
    }

    #[test]
    fn the_example_file_lists_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("harness.example.yml");
        let loaded = Config::load_from(Some(&path), Vec::<(String, String)>::new()).unwrap();
        assert_eq!(
            loaded.to_redacted_yaml(),
            Config::default().to_redacted_yaml(),
            "harness.example.yml says other values than the defaults"
        );
        let example: Value =
            serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let defaults = serde_norway::to_value(Config::default()).unwrap();
        fn keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
            if let Value::Mapping(m) = v {
                for (k, v) in m {
                    let k = format!("{prefix}{}", k.as_str().unwrap_or_default());
                    keys(v, &format!("{k}."), out);
                    out.push(k);
                }
            }
        }
        let (mut want, mut have) = (Vec::new(), Vec::new());
        keys(&defaults, "", &mut want);
        keys(&example, "", &mut have);
        let missing: Vec<&String> = want.iter().filter(|k| !have.contains(k)).collect();
        assert!(missing.is_empty(), "harness.example.yml lacks {missing:?}");
    }

    #[test]
    fn a_relative_logs_dir_lives_under_home() {
        let c =
            Config::load_from(None, [("HARNESS_HOME".to_string(), "/srv/h".to_string())]).unwrap();
        assert_eq!(c.logs_dir(), PathBuf::from("/srv/h/logs"));
        let c = Config::load_from(
            None,
            [(
                "HARNESS_TELEMETRY__LOGS_DIR".to_string(),
                "/var/log/h".to_string(),
            )],
        )
        .unwrap();
        assert_eq!(c.logs_dir(), PathBuf::from("/var/log/h"));
    }

    #[test]
    fn errors_about_secrets_never_quote_them() {
        for (var, raw) in [
            (
                "HARNESS_API__TOKENS",
                r#"[{"token":"supersecret-token-123456","scope":"admin""#,
            ),
            (
                "HARNESS_API__TOKENS",
                r#"{"token":"supersecret-token-123456"}"#,
            ),
            (
                "HARNESS_API__TOKENS",
                r#"[{"token":"supersecret-token-123456","scope":"boss"}]"#,
            ),
            (
                "HARNESS_API__TOKENS",
                r#"[{"token":"supersecret-token-123456","scope":"admin","x":1}]"#,
            ),
            (
                "HARNESS_API__TOKENS",
                r#"[{"token":12345678901234567890,"scope":"admin"}]"#,
            ),
            (
                "DATABASE_URL",
                "mysql://user:supersecret-token-123456@host/db",
            ),
            (
                "HARNESS_ESCALATION__WEBHOOK_URL",
                "ftp://supersecret-token-123456@x/",
            ),
            (
                "HARNESS_ESCALATION__SMTP_URL",
                "imap://u:supersecret-token-123456@x/",
            ),
        ] {
            let err = Config::load_from(None, [(var.to_string(), raw.to_string())])
                .unwrap_err()
                .to_string();
            assert!(!err.contains("supersecret"), "{var}: {err}");
            assert!(!err.contains("12345678901234567890"), "{var}: {err}");
            assert!(err.contains(var), "names the variable: {err}");
        }
        let err = Config::load_from(
            None,
            [("HARNESS_API__TOKENS".to_string(), "[{".to_string())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("JSON list like"), "{err}");
    }

    #[test]
    fn out_of_range_names_key_and_range() {
        let f = file("bulk:\n  max_concurrent: 0\n");
        let err = Config::load_from(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`bulk.max_concurrent`"), "{err}");
        assert!(err.contains("allowed 1 to 10000"), "{err}");
        assert!(err.contains(f.path().to_str().unwrap()), "{err}");
    }

    #[test]
    fn tokens_from_json_env_and_bad_scope() {
        let c = Config::load_from(
            None,
            env(&[(
                "HARNESS_API__TOKENS",
                r#"[{"token":"0123456789abcdef-admin","scope":"admin"}]"#,
            )]),
        )
        .unwrap();
        assert_eq!(c.api.tokens[0].scope, Scope::Admin);

        let err = Config::load_from(
            None,
            env(&[(
                "HARNESS_API__TOKENS",
                r#"[{"token":"0123456789abcdef-admin","scope":"root"}]"#,
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("api.tokens[0].scope"), "{err}");
        assert!(err.contains("HARNESS_API__TOKENS"), "{err}");
    }

    #[test]
    fn malformed_yaml_is_a_syntax_error() {
        let f = file("bulk: [unclosed\n");
        let err = Config::load_from(Some(f.path()), env(&[])).unwrap_err();
        assert!(matches!(err, Error::Syntax { .. }), "{err}");
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Config::load_from(
            None,
            env(&[
                ("DATABASE_URL", "postgres://app:hunter2@db:5432/harness"),
                (
                    "HARNESS_DATABASE__SESSION_URL",
                    "postgres://app:swordfish@db-direct:5432/harness",
                ),
                (
                    "HARNESS_ESCALATION__WEBHOOK_URL",
                    "https://hooks.example/T0/secret-path",
                ),
                (
                    "HARNESS_API__TOKENS",
                    r#"[{"token":"supersecrettoken-123","scope":"read"}]"#,
                ),
            ]),
        )
        .unwrap();
        let yaml = c.to_redacted_yaml();
        let debug = format!("{c:?}");
        for out in [&yaml, &debug] {
            assert!(!out.contains("hunter2"), "{out}");
            assert!(!out.contains("swordfish"), "{out}");
            assert!(!out.contains("secret-path"), "{out}");
            assert!(!out.contains("supersecrettoken"), "{out}");
        }
        assert!(
            yaml.contains("postgres://app:%5Bredacted%5D@db:5432/harness")
                || yaml.contains("app:[redacted]@db"),
            "{yaml}"
        );
        assert!(yaml.contains("@db-direct:5432/harness"), "{yaml}");
    }

    #[test]
    fn a_session_url_needs_a_url_and_a_postgres_scheme() {
        let load = |pairs: &[(&str, &str)]| Config::load_from(None, env(pairs));
        let err = load(&[("HARNESS_DATABASE__SESSION_URL", "postgres://u@db/h")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.session_url"), "{err}");
        assert!(err.contains("needs database.url as well"), "{err}");
        let pooler = ("DATABASE_URL", "postgres://u@pooler:6432/h");
        let err = load(&[pooler, ("HARNESS_DATABASE__SESSION_URL", "mysql://u@db/h")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.session_url"), "{err}");
        assert!(err.contains("postgres://"), "{err}");
        let c = load(&[
            pooler,
            ("HARNESS_DATABASE__SESSION_URL", "postgres://u@db:5432/h"),
        ])
        .unwrap();
        assert_eq!(
            c.database.session_url.unwrap().expose(),
            "postgres://u@db:5432/h"
        );
    }

    #[test]
    fn rescue_after_must_outlast_three_heartbeats() {
        let err = Config::load_from(None, env(&[("HARNESS_TELEMETRY__SAMPLE_INTERVAL_S", "15")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("persistence.rescue_after_s"), "{err}");
        assert!(
            err.contains("three times telemetry.sample_interval_s"),
            "{err}"
        );
        let err = Config::load_from(None, env(&[("HARNESS_PERSISTENCE__RESCUE_AFTER_S", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("persistence.rescue_after_s"), "{err}");
        assert!(err.contains("HARNESS_PERSISTENCE__RESCUE_AFTER_S"), "{err}");
    }

    #[test]
    fn every_later_range_is_checked() {
        for (var, bad) in [
            ("HARNESS_TELEMETRY__RETENTION_DAYS", "0"),
            ("HARNESS_API__MAX_BODY_KB", "0"),
            ("HARNESS_SCHEDULER__ELECT_INTERVAL_S", "0"),
            ("HARNESS_BULK__POLL_INTERVAL_MS", "1"),
            ("HARNESS_EXECUTOR__MAX_PROCESSES", "0"),
        ] {
            let err = Config::load_from(None, env(&[(var, bad)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(var), "{var}: {err}");
        }
    }

    #[test]
    fn numeric_looking_string_stays_a_string() {
        let c = Config::load_from(None, env(&[("HARNESS_EXECUTOR__PYTHON", "3")])).unwrap();
        assert_eq!(c.executor.python, "3");
    }
}
