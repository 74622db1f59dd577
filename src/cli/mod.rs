//! The `harness` subcommands. Each one loads the layered configuration, then calls the
//! library; errors are printed once, with what to do about them, and exit non-zero.

mod agents;
mod bench;
mod doctor;
pub(crate) mod init;
mod limits;
mod queues;
mod table;
mod tasks;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

use harness::config::redact_url;
use harness::db::{self, Database, IfAbsent};
use harness::queue::{NewTask, Queue, Status};
use harness::replica::{BUILTIN_KINDS, builtin_handlers};
use harness::{Config, Harness};

#[derive(Debug, Parser)]
#[command(
    name = "harness",
    version,
    about = "Run user agents and background jobs 24/7 on replicas coordinated through PostgreSQL",
    long_about = "Agent Harness runs user agents (Python or any command) and background jobs on a \
fleet of identical replicas that share nothing but a PostgreSQL database.\n\n\
Settings come from built-in defaults, then a YAML file (--config, $HARNESS_CONFIG or \
./harness.yml), then HARNESS_<SECTION>__<KEY> environment variables; DATABASE_URL sets \
database.url. Without a database URL, a private PostgreSQL is started (or joined) under \
.harness/ ($HARNESS_HOME) from the installed server binaries; only up, serve and migrate set \
one up, the other commands fail in a home that has none."
)]
pub struct Cli {
    /// YAML configuration file [default: $HARNESS_CONFIG, else ./harness.yml when present]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Log at info on one-shot commands too (they log warnings only by default; replicas
    /// always log at info). RUST_LOG overrides both.
    #[arg(short, long, global = true)]
    verbose: bool,

    #[command(subcommand)]
    command: Command,
}

/// The configuration file, accepted after the subcommand too (`harness serve --config f.yml`).
#[derive(Debug, Args)]
pub struct FileArg {
    /// YAML configuration file [default: $HARNESS_CONFIG, else ./harness.yml when present]
    #[arg(long = "config", value_name = "PATH")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a development instance: a private PostgreSQL when no DATABASE_URL is set,
    /// migrations, and a replica, until Ctrl-C
    #[command(long_about = "Start a development instance in one command.\n\n\
With no database URL configured this starts (or joins) a private PostgreSQL under \
.harness/ ($HARNESS_HOME) from the installed server binaries, applies the migrations, \
and runs a replica until Ctrl-C or SIGTERM. The private server stops when its last user exits.")]
    Up(ServeArgs),
    /// Run a replica: claim and run tasks until SIGTERM/Ctrl-C (a second signal exits at once)
    #[command(long_about = "Run a replica until SIGTERM or Ctrl-C.\n\n\
The replica registers itself in the replicas table, heartbeats it, claims tasks of the kinds \
it knows (built in: noop, echo, sleep, agent, command) as capacity allows, and rescues tasks of replicas that stopped \
heartbeating. On the first signal it stops claiming, lets running tasks finish for \
bulk.shutdown_grace_s, and hands the rest back to the queue without counting an attempt; a \
second signal exits at once. The REST API listens on api.bind unless --no-api.")]
    Serve(ServeArgs),
    /// Apply pending database migrations (idempotent; safe from several processes at once)
    Migrate(FileArg),
    /// Print the effective configuration as YAML, with secrets redacted
    Config(FileArg),
    /// Add a task to the queue and print {"id", "status", "deduplicated"}
    Enqueue(EnqueueArgs),
    /// Count tasks per status, with the total and success rate, the waiting and running tasks
    /// of each queue, and what each limit holds back
    Stats {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        file: FileArg,
    },
    /// List, cancel, retry and delete tasks
    Tasks(tasks::TasksArgs),
    /// Print a task's output (stdout, stderr, progress); --follow streams it until the task
    /// ends, from whichever replica runs it
    Logs(tasks::LogsArgs),
    /// Show a task's whole record, its attempt history included
    Inspect {
        /// The task id
        task_id: i64,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        file: FileArg,
    },
    /// Measure enqueue rate, processing rate and pick-up latency of no-op tasks (or, with
    /// --console, the web console's render times over a big history)
    Bench(bench::BenchArgs),
    /// Register, change, run and inspect agents
    Agents(agents::AgentsArgs),
    /// List live replicas (heartbeat age, leader, governor state, capacity, running tasks,
    /// latest CPU and memory, isolation, queues served) after what holds work back fleet-wide
    /// (quarantines, paused queues, limits), or resume replicas the governor holds
    Fleet {
        #[command(subcommand)]
        action: Option<FleetAction>,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        file: FileArg,
    },
    /// List queues (runnable, delayed, running, paused, served by), or pause and resume one
    /// fleet-wide
    Queues(queues::QueuesArgs),
    /// List, set and remove fleet-wide concurrency and rate limits of queues, kinds, agents
    /// and concurrency keys
    Limits(limits::LimitsArgs),
    /// Run Python agent code once in the sandbox and print its result as JSON
    #[command(
        long_about = "Run a Python agent file once, exactly as a replica would: isolated \
subprocess, scrubbed environment, resource limits, timeout. Prints the ExecutionResult \
{status, result, error, stdout, stderr, exit_code, duration} as JSON. Exits 0 on success, \
1 on error and 124 on timeout. Needs no database."
    )]
    Exec(ExecArgs),
    /// Check what a replica needs here: Python, the agent account, isolation, the database
    /// and its migrations, api.bind, api.tokens (exit code 1 when a check fails)
    #[command(
        long_about = "Check what a replica on this host needs, one line per check with \
ok, warn or FAIL and what to do: the Python interpreter (executor.python) and its version, \
the account agents run as (executor.run_as, executor.uid_range), the isolation mode and what \
it lacks, whether the database is reachable (a private one is never set up by this) and has \
every migration, whether api.bind can be bound (or who holds it), and whether api.tokens are \
configured. Exits 1 when any check fails."
    )]
    Doctor {
        /// Print {\"ok\": bool, \"checks\": [{check, status, detail, fix}]} instead of lines
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        file: FileArg,
    },
    /// Stop the private PostgreSQL of the home ($HARNESS_HOME, default ./.harness)
    #[command(
        long_about = "Stop the private PostgreSQL that `harness up` (or another command) \
started under the home ($HARNESS_HOME, default ./.harness): a fast shutdown, waiting until the \
server has exited. Nothing to do when none runs. While harness processes still use it (a \
replica of `up` or `serve`, a one-shot command) it refuses and lists their pids; stop them and \
the last one stops the server, or pass --force to stop it under them (their database \
connections fail until they are stopped). With database.url set (DATABASE_URL) there is no \
private server and it refuses."
    )]
    Down {
        /// Stop the server even while harness processes use it
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        file: FileArg,
    },
    /// Print a shell completion script for harness (e.g. `harness completions bash >
    /// /etc/bash_completion.d/harness`)
    Completions {
        /// The shell to complete in
        shell: clap_complete::Shell,
    },
    /// Not a command: says where resuming an agent or a replica lives (exit code 2)
    #[command(hide = true)]
    Resume {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct ExecArgs {
    /// The agent file (Python defining `class Agent`)
    file: PathBuf,
    /// The agent's config, as a JSON object (passed to Agent(config)). The harness's own
    /// config file goes before the subcommand: `harness --config f.yml exec ...`
    #[arg(long, value_name = "JSON")]
    config: Option<String>,
    /// A previous run's state, as JSON (seen as self.handoff["state"])
    #[arg(long, value_name = "JSON")]
    state: Option<String>,
    /// The run's input, as JSON (seen as self.input)
    #[arg(long, value_name = "JSON")]
    input: Option<String>,
    /// Time limit, e.g. 60s [default: executor.default_timeout_s]
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Memory limit in MB [default: executor.max_memory_mb]
    #[arg(long)]
    memory_mb: Option<u64>,
    /// CPU share in percent [default: executor.max_cpu_percent]
    #[arg(long)]
    cpu_percent: Option<u32>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    file: FileArg,
    /// Serve no REST API, only /healthz, /readyz and /metrics on api.bind (a worker-only
    /// replica)
    #[arg(long)]
    no_api: bool,
    /// Apply no migrations: start only if the database has every migration of this binary
    /// (`harness migrate` or the chart's Job applies them), so the runtime role needs no DDL
    /// rights
    #[arg(long)]
    no_migrate: bool,
}

#[derive(Debug, Subcommand)]
enum FleetAction {
    /// Lift the hold of a replica the governor escalated (or of every replica with --all,
    /// which also lifts every quarantine of an agent or kind)
    Resume {
        /// The replica id, as `harness fleet` lists it
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        replica: Option<String>,
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Args)]
struct EnqueueArgs {
    #[command(flatten)]
    file: FileArg,
    /// The task kind (built in: noop, echo, sleep, agent, command)
    kind: String,
    /// The payload, as JSON
    payload: String,
    /// At most one task per key: enqueueing the key again returns the existing task
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Higher runs first: an integer, or low (-10), normal (0), high (10), urgent (100)
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = parse_priority)]
    priority: i32,
    /// Not before this long from now, e.g. 30s, 5m, 1h
    #[arg(long, value_parser = parse_duration, conflicts_with = "run_at")]
    delay: Option<Duration>,
    /// Not before this time (RFC 3339, e.g. 2026-01-31T12:00:00Z)
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    run_at: Option<DateTime<Utc>>,
    /// Retries after the first attempt [default: bulk.retry_attempts]
    #[arg(long)]
    max_retries: Option<u32>,
    /// Time limit of each attempt, e.g. 90s [default: the kind's]
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// The queue it waits in [default: default]: only replicas serving it run it
    #[arg(long)]
    queue: Option<String>,
    /// What limits of scope key count it under (e.g. a customer id)
    #[arg(long, value_name = "KEY")]
    concurrency_key: Option<String>,
}

/// `30s`, `5m`, `1h 30m`, `250ms`; a bare number is seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("{s:?} is not a duration; use e.g. 30s, 5m, 1h"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 30s, 5m, 1h"))
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time ({e}); use e.g. 2026-01-31T12:00:00Z"))
}

impl Command {
    /// The config file named after the subcommand, if any.
    fn file(&self) -> Option<&Path> {
        match self {
            Command::Up(a) | Command::Serve(a) => a.file.file.as_deref(),
            Command::Migrate(f) | Command::Config(f) => f.file.as_deref(),
            Command::Stats { file, .. }
            | Command::Inspect { file, .. }
            | Command::Fleet { file, .. }
            | Command::Down { file, .. }
            | Command::Doctor { file, .. } => file.file.as_deref(),
            Command::Enqueue(a) => a.file.file.as_deref(),
            Command::Bench(a) => a.file.file.as_deref(),
            Command::Agents(a) => a.file.file.as_deref(),
            Command::Tasks(a) => a.file.file.as_deref(),
            Command::Queues(a) => a.file.file.as_deref(),
            Command::Limits(a) => a.file.file.as_deref(),
            Command::Logs(a) => a.file.file.as_deref(),
            Command::Exec(_) | Command::Completions { .. } | Command::Resume { .. } => None,
        }
    }
}

pub fn run(cli: Cli) -> ExitCode {
    // These need no configuration: a broken harness.yml must not break them.
    match &cli.command {
        Command::Completions { shell } => return completions(*shell),
        Command::Resume { args } => return resume_is_no_command(args),
        _ => {}
    }
    let file = cli
        .command
        .file()
        .or(cli.config.as_deref())
        .map(Path::to_path_buf);
    let cfg = match Config::load(file.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // A replica's id is known before logging starts, so exported spans and metrics carry it.
    let replica_id = matches!(cli.command, Command::Up(_) | Command::Serve(_))
        .then(harness::fleet::new_replica_id);
    let filter = if replica_id.is_some() || cli.verbose {
        harness::telemetry::REPLICA_LOG_FILTER
    } else {
        "warn"
    };
    let telemetry =
        harness::telemetry::init(cfg.telemetry.log_format, replica_id.as_deref(), filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(a) => serve(cfg, true, &a, replica_id.unwrap_or_default()).await,
            Command::Serve(a) => serve(cfg, false, &a, replica_id.unwrap_or_default()).await,
            Command::Migrate(_) => migrate(cfg).await,
            Command::Config(_) => {
                print!("{}", cfg.to_redacted_yaml());
                Ok(())
            }
            Command::Enqueue(args) => enqueue(cfg, args).await,
            Command::Stats { json, .. } => stats(cfg, json).await,
            Command::Inspect { task_id, json, .. } => inspect(cfg, task_id, json).await,
            Command::Down { force, .. } => down(cfg, force).await,
            Command::Doctor { json, .. } => return doctor::run(cfg, json).await,
            Command::Bench(args) => bench::run(cfg, args).await,
            Command::Exec(args) => return exec(cfg, args).await,
            // Answered above, before the configuration is loaded; the same answer here.
            Command::Completions { shell } => return Ok(completions(shell)),
            Command::Resume { args } => return Ok(resume_is_no_command(&args)),
            Command::Agents(args) => agents::run(cfg, args).await,
            Command::Tasks(args) => tasks::run(cfg, args).await,
            Command::Queues(args) => queues::run(cfg, args).await,
            Command::Limits(args) => limits::run(cfg, args).await,
            Command::Logs(args) => return tasks::logs(cfg, args).await,
            Command::Fleet {
                action: None, json, ..
            } => fleet(cfg, json).await,
            Command::Fleet {
                action: Some(FleetAction::Resume { replica, .. }),
                ..
            } => fleet_resume(cfg, replica).await,
        }
        .map(|()| ExitCode::SUCCESS)
    });
    // Spans and metrics still buffered go out before the process ends.
    runtime.block_on(async {
        tokio::task::spawn_blocking(move || telemetry.shutdown())
            .await
            .ok()
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the completion script for `shell` to stdout.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    use clap::CommandFactory;
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "harness",
        &mut std::io::stdout(),
    );
    ExitCode::SUCCESS
}

/// What `harness resume …` says (exit code 2, a usage error): resuming is a subcommand of
/// `agents` and of `fleet`, and `serve` (which once answered to `resume`) is neither.
fn resume_is_no_command(args: &[String]) -> ExitCode {
    let named = args.iter().find(|a| !a.starts_with('-'));
    let name = named.map_or("<name>", String::as_str);
    let replica = named.map_or("<replica>", String::as_str);
    eprintln!(
        "error: `harness resume` is not a command. To resume a paused agent run \
         `harness agents resume {name}`; to lift the governor's hold on a replica run \
         `harness fleet resume {replica}` (or `harness fleet resume --all`). A replica is \
         started with `harness serve`."
    );
    ExitCode::from(2)
}

/// A task priority: an integer, or one of the names `low`, `normal`, `high`, `urgent`.
fn parse_priority(raw: &str) -> Result<i32, String> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "low" => Ok(-10),
        "normal" => Ok(0),
        "high" => Ok(10),
        "urgent" => Ok(100),
        other => other.parse().map_err(|_| {
            format!(
                "{raw:?} is not a priority; give an integer (higher runs first, e.g. 10 or -5) \
                 or low, normal, high, urgent"
            )
        }),
    }
}

fn parse_json_arg(name: &str, raw: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(raw).map_err(|e| anyhow::anyhow!("{name} is not valid JSON: {e}"))
}

async fn exec(cfg: Config, args: ExecArgs) -> anyhow::Result<ExitCode> {
    use harness::executor::{ExecStatus, Executor, RunSpec, Runtime};
    let code = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    warn_if_shared_user(&cfg);
    let executor = Executor::new(&cfg.executor)?;
    executor.isolation.warn_if_degraded();
    if let Err(e) = executor.check_python(&code).await {
        bail!("{} is not a valid agent: {e}", args.file.display());
    }
    let mut spec = RunSpec::new(Runtime::Python { code }, &executor);
    if let Some(c) = &args.config {
        let config = parse_json_arg("--config", c)?;
        if !config.is_object() {
            bail!("--config must be a JSON object");
        }
        spec.config = config;
    }
    if let Some(i) = &args.input {
        spec.input = parse_json_arg("--input", i)?;
    }
    if let Some(s) = &args.state {
        let state = parse_json_arg("--state", s)?;
        spec.handoff = serde_json::json!({
            "agent_id": null, "run_number": 1, "state": state, "summary": null,
            "metadata": {}, "compressed": false,
        });
    }
    if let Some(t) = args.timeout {
        spec.timeout = t;
    }
    if let Some(m) = args.memory_mb {
        spec.memory_mb = m;
    }
    if let Some(p) = args.cpu_percent {
        spec.cpu_percent = p;
    }
    let result = executor.run(&spec).await?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(match result.status {
        ExecStatus::Success => ExitCode::SUCCESS,
        ExecStatus::Error => ExitCode::FAILURE,
        ExecStatus::Timeout => ExitCode::from(124),
    })
}

/// The database with every migration of this binary applied. One-shot commands pass
/// [`IfAbsent::Refuse`]: only `up`, `serve` and `migrate` set a private database up.
pub(crate) async fn open_migrated(cfg: &Config, if_absent: IfAbsent) -> anyhow::Result<Database> {
    let database = Database::open_with(cfg, if_absent).await?;
    // Nothing to apply: no DDL at all (the role may have none), no migration lock taken.
    if !db::missing_migrations(&database.pool)
        .await
        .context("reading the applied migrations")?
        .is_empty()
    {
        database.migrate().await.context("applying migrations")?;
    }
    Ok(database)
}

/// The database, checked to have every migration of this binary (`serve --no-migrate`).
async fn open_current(cfg: &Config) -> anyhow::Result<Database> {
    let database = Database::open(cfg).await?;
    let missing = db::missing_migrations(&database.pool)
        .await
        .context("reading the applied migrations")?;
    if !missing.is_empty() {
        bail!(
            "the database lacks migrations {missing:?} of this binary and --no-migrate says not \
             to apply them; run `harness migrate` (the chart's migration Job does) first"
        );
    }
    Ok(database)
}

async fn migrate(cfg: Config) -> anyhow::Result<()> {
    let database = open_migrated(&cfg, IfAbsent::Create).await?;
    let count = db::MIGRATOR.iter().count();
    println!(
        "database {} is at schema version {} ({count} migrations)",
        redact_url(database.url()),
        db::MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
    );
    database.close().await;
    Ok(())
}

async fn down(cfg: Config, force: bool) -> anyhow::Result<()> {
    let home = std::path::absolute(&cfg.home).unwrap_or_else(|_| cfg.home.clone());
    if cfg.database.url.is_some() {
        bail!(
            "database.url is set (DATABASE_URL or the config file), so harness uses that server \
             and runs no private PostgreSQL to stop; stop that server with its own tools, or \
             unset DATABASE_URL to act on the private one under {}",
            home.display()
        );
    }
    let at = home.clone();
    let done = tokio::task::spawn_blocking(move || db::shut_down_home(&at, force))
        .await
        .context("stopping the private PostgreSQL")??;
    let pids = |users: &[i32]| {
        let list: Vec<String> = users.iter().map(i32::to_string).collect();
        list.join(", ")
    };
    match done {
        db::Shutdown::Stopped { pid, users } => {
            if !users.is_empty() {
                eprintln!(
                    "warning: harness processes {} were still using it; their database \
                     connections fail until they are stopped",
                    pids(&users)
                );
            }
            println!(
                "stopped the private PostgreSQL under {} (pid {pid})",
                home.display()
            );
        }
        db::Shutdown::NotRunning => {
            println!("no private PostgreSQL is running under {}", home.display())
        }
        db::Shutdown::InUse { pid, users } => bail!(
            "the private PostgreSQL under {} (pid {pid}) is in use by {}; stop them (Ctrl-C) \
             and the last one stops it, or run `harness down --force` to stop it under them",
            home.display(),
            if users.is_empty() {
                "other harness processes".to_string()
            } else {
                format!(
                    "harness processes {} (replicas or one-shot commands)",
                    pids(&users)
                )
            }
        ),
    }
    Ok(())
}

async fn serve(
    mut cfg: Config,
    announce: bool,
    args: &ServeArgs,
    replica_id: String,
) -> anyhow::Result<()> {
    let with_api = !args.no_api;
    // Not root: agents would share our user. `serve` (production) needs the operator's yes.
    if !nix::unistd::Uid::effective().is_root() {
        if !announce && !cfg.executor.allow_shared_user {
            bail!(
                "harness serve runs as uid {}, not root, so agents would run as this same user \
                 and could read its files and signal its processes; run it as root (agents then \
                 run as executor.run_as) or set executor.allow_shared_user: true \
                 (HARNESS_EXECUTOR__ALLOW_SHARED_USER=true) to accept that",
                nix::unistd::Uid::effective()
            );
        }
        warn_if_shared_user(&cfg);
    }
    // Before anything else: from here on SIGTERM means "drain", never "die".
    let private = std::sync::Arc::new(std::sync::OnceLock::new());
    let stop = stop_on_signals(
        private.clone(),
        cfg.database.url.is_none().then(|| cfg.home.clone()),
    )?;
    let executor = std::sync::Arc::new(harness::executor::Executor::new(&cfg.executor)?);
    // `up` on a reachable address with no token would expose the API: make one.
    let generated_token =
        (announce && with_api && cfg.api.tokens.is_empty() && !cfg.api.bind.ip().is_loopback())
            .then(|| generate_admin_token(&mut cfg));
    let database = if args.no_migrate {
        open_current(&cfg).await?
    } else {
        open_migrated(&cfg, IfAbsent::Create).await?
    };
    if let Some(server) = database.private_server() {
        let _ = private.set(server.stopper());
    }
    let agents = harness::agents::Agents::new(database.pool.clone(), executor.clone());
    let harness = builtin_handlers(Harness::builder())
        .agents(agents.clone())
        .isolation(executor.isolation)
        .replica_id(replica_id)
        .config(cfg.clone())
        .pool(database.pool.clone())
        .build()
        .await?;
    tracing::info!(
        python = %executor.python.display(),
        run_as = executor.run_as().unwrap_or("(the harness's own user)"),
        isolation = %executor.isolation.describe(),
        "agents run in the sandbox"
    );
    executor.isolation.warn_if_degraded();

    // A worker-only replica still answers health checks and scrapes.
    let listener = Some(bind_api(&cfg).await?);
    let api_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(addr) = api_addr {
        if with_api {
            tracing::info!(%addr, "REST API listening");
        } else {
            tracing::info!(%addr, "health and metrics listening (--no-api)");
        }
    }
    if announce {
        announce_up(
            &database,
            &harness,
            api_addr.filter(|_| with_api),
            generated_token.as_deref(),
        );
    }
    let api_stop = tokio_util::sync::CancellationToken::new();
    let api = listener.map(|listener| {
        let state = std::sync::Arc::new(harness::api::ApiState {
            queue: harness.queue().clone(),
            agents: Some(agents),
            pool: database.pool.clone(),
            tokens: cfg.api.tokens.clone(),
            registry: harness.registry(),
            config: cfg.clone(),
            draining: stop.clone(),
        });
        let router = if with_api {
            harness::api::router(state)
        } else {
            harness::api::health_router(state)
        };
        tokio::spawn(harness::api::serve(
            listener,
            router,
            harness::api::server::ServerLimits::from_config(&cfg.api),
            api_stop.clone().cancelled_owned(),
        ))
    });
    let served = harness.serve(stop.cancelled()).await;
    // The API (health, metrics) served through the drain; now it stops too.
    api_stop.cancel();
    served?;
    if let Some(api) = api {
        // In-flight requests finish (graceful shutdown); bounded by the request timeout.
        let _ = tokio::time::timeout(Duration::from_secs(cfg.api.request_timeout_s + 1), api).await;
    }
    database.close().await;
    Ok(())
}

/// Says once, on stderr, that agents will run as this process's own user (not root).
fn warn_if_shared_user(cfg: &Config) {
    if !nix::unistd::Uid::effective().is_root() && !cfg.executor.allow_shared_user {
        eprintln!(
            "warning: not running as root, so agents run as this same user (uid {}); fine for \
             development, not for agents you do not trust (set executor.allow_shared_user: true \
             to silence this)",
            nix::unistd::Uid::effective()
        );
    }
}

/// How long the second signal gives the private PostgreSQL's fast shutdown before stopping
/// it in immediate mode (crash recovery at the next start).
const SECOND_SIGNAL_GRACE: Duration = Duration::from_secs(5);

/// A token cancelled by the first SIGINT or SIGTERM; a second one exits at once, leaving
/// unfinished tasks to be rescued, after leaving the private server of `private` (set once
/// the database is open), which stops it when this was its last user. `home`: where the
/// private server lives when one is used.
fn stop_on_signals(
    private: std::sync::Arc<std::sync::OnceLock<db::Stopper>>,
    home: Option<PathBuf>,
) -> anyhow::Result<tokio_util::sync::CancellationToken> {
    let mut signals = Signals::register().context("installing signal handlers")?;
    let stop = tokio_util::sync::CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        signals.next().await;
        cancel.cancel();
        signals.next().await;
        let Some(stopper) = private.get().cloned() else {
            match home {
                // Between start-up and an open database a server may be starting there.
                Some(home) => eprintln!(
                    "second signal: exiting now (if a private PostgreSQL was starting under {}, \
                     `harness down` stops it)",
                    std::path::absolute(&home).unwrap_or(home).display()
                ),
                None => eprintln!("second signal: exiting now"),
            }
            std::process::exit(130);
        };
        let home = stopper.home().display().to_string();
        eprintln!("second signal: stopping the private PostgreSQL under {home}, then exiting");
        let left = tokio::task::spawn_blocking(move || stopper.stop_now(SECOND_SIGNAL_GRACE)).await;
        match left {
            Ok(Ok(db::Left::Stopped { pid })) => {
                eprintln!("stopped the private PostgreSQL under {home} (pid {pid}); exiting now")
            }
            Ok(Ok(db::Left::InUse)) => eprintln!(
                "the private PostgreSQL under {home} keeps running for the other harness \
                 processes using it; exiting now"
            ),
            Ok(Ok(db::Left::Nothing)) => eprintln!("exiting now"),
            Ok(Err(e)) => eprintln!(
                "could not stop the private PostgreSQL under {home} ({e}); `harness down` \
                 stops it; exiting now"
            ),
            Err(e) => {
                eprintln!("could not stop the private PostgreSQL under {home} ({e}); exiting now")
            }
        }
        std::process::exit(130);
    });
    Ok(stop)
}

/// Adds a random admin token to the configuration, for this process only, and returns it.
fn generate_admin_token(cfg: &mut Config) -> String {
    let token: String = (0..32)
        .map(|_| format!("{:x}", rand::random::<u8>() & 0xf))
        .collect();
    cfg.api.tokens.push(harness::config::ApiToken {
        token: harness::config::Secret::new(token.clone()),
        scope: harness::config::Scope::Admin,
    });
    token
}

async fn bind_api(cfg: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(cfg.api.bind)
        .await
        .with_context(|| {
            format!(
                "cannot listen on api.bind {}; choose another address (HARNESS_API__BIND) or run \
                 with --no-api",
                cfg.api.bind
            )
        })
}

/// What `up` prints once serving: where the database is, what runs, where the API is.
fn announce_up(
    database: &db::Database,
    harness: &Harness,
    api_addr: Option<std::net::SocketAddr>,
    generated_token: Option<&str>,
) {
    let api = api_addr.map_or("no API".to_string(), |a| {
        format!("API on http://{a} (the console at http://{a}/)")
    });
    match database.private_server() {
        Some(server) => eprintln!(
            "Agent Harness is up with a private PostgreSQL under {} ({}).\n\
             Replica {} is running tasks of kinds {}; {api}. Press Ctrl-C to stop.",
            server.home().display(),
            server.psql_command(db::PRIVATE_DATABASE),
            harness.replica_id(),
            harness.kinds().join(", "),
        ),
        None => eprintln!(
            "Agent Harness is up on {}.\nReplica {} is running tasks of kinds {}; {api}. \
             Press Ctrl-C to stop.",
            redact_url(database.url()),
            harness.replica_id(),
            harness.kinds().join(", "),
        ),
    }
    if let Some(t) = generated_token {
        eprintln!(
            "The API listens beyond loopback and no api.tokens are configured: use this admin \
             token (Authorization: Bearer {t}); it lasts until this process exits."
        );
    }
}

async fn enqueue(cfg: Config, args: EnqueueArgs) -> anyhow::Result<()> {
    let known: Vec<&str> = BUILTIN_KINDS
        .iter()
        .copied()
        .chain([harness::agents::AGENT_KIND, harness::agents::COMMAND_KIND])
        .collect();
    if !known.contains(&args.kind.as_str()) {
        bail!(
            "unknown kind {:?}: this binary runs kinds {}",
            args.kind,
            known.join(", ")
        );
    }
    let payload: serde_json::Value = serde_json::from_str(&args.payload)
        .map_err(|e| anyhow::anyhow!("the payload is not valid JSON: {e}"))?;
    if let Some(Err(e)) = harness::replica::validate_builtin(&args.kind, &payload) {
        bail!("invalid payload for kind {}: {e}", args.kind);
    }
    let mut task = NewTask::new(args.kind, payload).priority(args.priority);
    if let Some(k) = args.idempotency_key {
        task = task.idempotency_key(k);
    }
    if let Some(d) = args.delay {
        task = task.delay(d);
    }
    if let Some(t) = args.run_at {
        task = task.run_at(t);
    }
    if let Some(n) = args.max_retries {
        task = task.max_retries(n);
    }
    if let Some(t) = args.timeout {
        task = task.timeout(t);
    }
    let database = open_migrated(&cfg, IfAbsent::Refuse).await?;
    if let Some(agent) =
        harness::agents::agent_of_payload(&database.pool, &task.kind, &task.payload).await?
    {
        task = task.agent_id(agent);
        // An agent's run waits in the agent's queue unless told otherwise.
        task = task.queue(harness::agents::queue_of(&database.pool, agent).await?);
    }
    if let Some(q) = args.queue {
        task = task.queue(q);
    }
    if let Some(k) = args.concurrency_key {
        task = task.concurrency_key(k);
    }
    let queue = Queue::new(database.pool.clone(), cfg.bulk.retry_attempts);
    let result = queue.enqueue(task).await;
    warn_if_no_replica(&cfg, &database.pool).await;
    database.close().await;
    println!("{}", serde_json::to_string(&result?)?);
    Ok(())
}

/// Says so on stderr when no replica has a live heartbeat: what was just queued waits until
/// one runs.
pub(crate) async fn warn_if_no_replica(cfg: &Config, pool: &sqlx::PgPool) {
    let max_age = Duration::from_secs(cfg.persistence.rescue_after_s);
    if let Ok(rows) = harness::fleet::replicas::list(pool, max_age).await
        && rows.is_empty()
    {
        eprintln!(
            "warning: no replica is running against this database; the task waits until one \
             does (`harness serve`, or `harness up` for development)"
        );
    }
}

async fn stats(cfg: Config, json: bool) -> anyhow::Result<()> {
    let database = open_migrated(&cfg, IfAbsent::Refuse).await?;
    let queue = Queue::new(database.pool.clone(), cfg.bulk.retry_attempts);
    let stats = queue.stats().await;
    let queues = harness::queue::queues::list(&database.pool).await;
    let limits = limits::listed(&database.pool).await;
    database.close().await;
    let (stats, queues, (limits, names)) = (stats?, queues?, limits?);
    if json {
        let mut obj = serde_json::Map::new();
        obj.insert("total".into(), stats.total.into());
        for s in Status::ALL {
            obj.insert(s.as_str().into(), stats.count(s).into());
        }
        obj.insert("success_rate".into(), stats.success_rate.into());
        obj.insert("queues".into(), serde_json::to_value(&queues)?);
        obj.insert("limits".into(), serde_json::to_value(&limits)?);
        println!("{}", serde_json::Value::Object(obj));
    } else {
        let mut t = table::Table::new(&["STATUS", "TASKS"]);
        for s in Status::ALL {
            t.row(vec![s.as_str().to_string(), stats.count(s).to_string()]);
        }
        t.row(vec!["total".into(), stats.total.to_string()]);
        t.print();
        println!("success rate {:.1}%", stats.success_rate);
        if !queues.is_empty() {
            println!();
            let mut t = table::Table::new(&["QUEUE", "RUNNABLE", "DELAYED", "RUNNING", "STATE"]);
            for q in queues {
                t.row(vec![
                    q.name,
                    q.runnable.to_string(),
                    q.delayed.to_string(),
                    q.running.to_string(),
                    if q.paused { "paused" } else { "running" }.to_string(),
                ]);
            }
            t.print();
        }
        if !limits.is_empty() {
            println!();
            let mut t = table::Table::new(&["LIMIT", "RUNNING", "HELD BACK"]);
            for l in limits {
                t.row(vec![
                    limits::target_text(&l.limit, &names),
                    l.running.to_string(),
                    l.waiting.to_string(),
                ]);
            }
            t.print();
        }
    }
    Ok(())
}

async fn fleet_resume(cfg: Config, replica: Option<String>) -> anyhow::Result<()> {
    let database = open_migrated(&cfg, IfAbsent::Refuse).await?;
    let n = harness::fleet::replicas::request_resume(&database.pool, replica.as_deref()).await;
    let lifted = match replica {
        None => harness::fleet::quarantines::lift(&database.pool, None).await,
        Some(_) => Ok(0),
    };
    database.close().await;
    match (n?, replica) {
        (0, Some(r)) => bail!("no replica {r:?}; `harness fleet` lists the live ones"),
        (n, Some(r)) => println!("asked replica {r} to resume ({n}); it does at its next sample"),
        (n, None) => println!(
            "asked {n} replica(s) to resume; each does at its next sample; lifted {} \
             quarantine(s)",
            lifted?
        ),
    }
    Ok(())
}

async fn fleet(cfg: Config, json: bool) -> anyhow::Result<()> {
    let database = open_migrated(&cfg, IfAbsent::Refuse).await?;
    // A replica is live while its heartbeat is younger than the rescue threshold.
    let max_age = Duration::from_secs(cfg.persistence.rescue_after_s);
    let rows = harness::fleet::replicas::list(&database.pool, max_age).await;
    if json {
        database.close().await;
        println!("{}", serde_json::to_string(&rows?)?);
        return Ok(());
    }
    let quarantines = harness::fleet::quarantines::active(&database.pool).await;
    let queues = harness::queue::queues::list(&database.pool).await;
    let limits = limits::listed(&database.pool).await;
    database.close().await;
    let (rows, quarantines, queues, (limits, names)) = (rows?, quarantines?, queues?, limits?);
    // What holds work back fleet-wide, one line each, before the replicas.
    print_quarantines(&quarantines);
    for q in queues.iter().filter(|q| q.paused) {
        let why = if q.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", q.reason)
        };
        println!(
            "paused: queue {}{why}, {} runnable: no replica claims from it until `harness queues resume {}`",
            q.name, q.runnable, q.name
        );
    }
    for l in &limits {
        println!(
            "limit: {}: {} running, {} held back",
            limits::describe(&l.limit, &names),
            l.running,
            l.waiting
        );
    }
    if rows.is_empty() {
        println!("no live replicas (start one with `harness serve`)");
        return Ok(());
    }
    let mut t = table::Table::new(&[
        "REPLICA",
        "HB AGE",
        "LEADER",
        "STATE",
        "CAPACITY",
        "RUNNING",
        "CPU",
        "MEM",
        "ISOLATION",
        "QUEUES",
    ]);
    let pct = |v: Option<f32>| v.map_or("-".to_string(), |v| format!("{v:.0}%"));
    for r in rows {
        t.row(vec![
            r.id.clone(),
            format!("{:.1}s", r.heartbeat_age_s),
            match (r.is_leader, r.leader_since) {
                (true, Some(t)) => format!("since {}", t.format("%Y-%m-%d %H:%M:%S")),
                (true, None) => "leader".to_string(),
                _ => "-".to_string(),
            },
            r.governor_state.as_str().to_string(),
            r.capacity.to_string(),
            r.running.to_string(),
            pct(r.cpu_percent),
            pct(r.memory_percent),
            r.isolation.clone().unwrap_or_else(|| "-".into()),
            queues::served(&r.queues),
        ]);
    }
    t.print();
    Ok(())
}

/// The quarantines in force, one line each, before the replicas.
fn print_quarantines(quarantines: &[harness::fleet::quarantines::Quarantine]) {
    for q in quarantines {
        let what = q.what();
        let until = if q.held {
            "until a person lifts it (harness agents resume <name>, harness fleet resume --all)"
                .to_string()
        } else {
            format!("until {}", q.until.to_rfc3339())
        };
        println!(
            "quarantined: {what} {until}, by {}: {}",
            q.replica_id, q.reason
        );
    }
}

async fn inspect(cfg: Config, id: i64, json: bool) -> anyhow::Result<()> {
    let database = open_migrated(&cfg, IfAbsent::Refuse).await?;
    let queue = Queue::new(database.pool.clone(), cfg.bulk.retry_attempts);
    let task = queue.get_with_progress(id).await;
    database.close().await;
    let task = task?;
    if json {
        println!("{}", serde_json::to_string_pretty(&task)?);
        return Ok(());
    }
    let t = |v: Option<DateTime<Utc>>| v.map_or("-".to_string(), |t| t.to_rfc3339());
    println!("task {} ({})", task.id, task.kind);
    println!("  status        {}", task.status);
    println!("  priority      {}", task.priority);
    println!(
        "  attempt       {} (retries {}/{})",
        task.attempt, task.retry_count, task.max_retries
    );
    if let Some(k) = &task.idempotency_key {
        println!("  idempotency   {k}");
    }
    println!("  created_at    {}", task.created_at.to_rfc3339());
    println!("  scheduled_at  {}", task.scheduled_at.to_rfc3339());
    println!("  started_at    {}", t(task.started_at));
    println!("  completed_at  {}", t(task.completed_at));
    if let Some(r) = &task.replica {
        println!("  replica       {r}");
    }
    println!("  payload       {}", task.payload);
    if let Some(r) = &task.result {
        println!("  result        {r}");
    }
    if let Some(p) = &task.progress {
        println!(
            "  progress     {} (attempt {}, {})",
            tasks::progress_text(&p.progress),
            p.attempt,
            p.at.to_rfc3339()
        );
    }
    if let Some(e) = &task.error {
        println!("  error         {e}");
    }
    for a in &task.attempts {
        println!(
            "  attempt {} {} on {} ({} → {}): {}",
            a.attempt,
            a.status.as_str(),
            a.replica.as_deref().unwrap_or("?"),
            a.started_at.map_or("?".to_string(), |t| t.to_rfc3339()),
            a.ended_at.to_rfc3339(),
            // The whole error is above (the latest) or in --json: one line each here.
            a.error
                .as_deref()
                .and_then(|e| e.lines().rev().find(|l| !l.trim().is_empty()))
                .unwrap_or("")
        );
    }
    println!("  output: harness logs {}", task.id);
    Ok(())
}

/// SIGINT and SIGTERM, registered when this is created (not when first awaited), so a
/// signal that arrives during start-up is caught rather than killing the process outright.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn register() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the next SIGINT (Ctrl-C) or SIGTERM.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_take_names_and_say_what_is_allowed() {
        assert_eq!(parse_priority("high"), Ok(10));
        assert_eq!(parse_priority("URGENT"), Ok(100));
        assert_eq!(parse_priority("-5"), Ok(-5));
        let e = parse_priority("highest").unwrap_err();
        assert!(e.contains("low, normal, high, urgent"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("soon").unwrap_err().contains("30s"));
        let err = parse_duration("-1").unwrap_err();
        assert!(err.contains("\"-1\""), "{err}");
    }
}
