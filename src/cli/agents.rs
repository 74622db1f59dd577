//! `harness agents …`: register, change, run and inspect agents.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use harness::Config;
use harness::agents::{AgentOwnConfig, AgentSettings, AgentSpec, Agents, Overlap};
use harness::db::IfAbsent;
use harness::executor::{Executor, Runtime};
use harness::queue::Queue;

use super::table::Table;
use super::{FileArg, open_migrated, parse_duration};

#[derive(Debug, Args)]
pub struct AgentsArgs {
    #[command(subcommand)]
    command: AgentsCommand,
    #[command(flatten)]
    pub file: FileArg,
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// Register an agent: Python code (--file) or a command (--command); prints a one-line
    /// confirmation (--json: the whole agent)
    Add {
        name: String,
        #[command(flatten)]
        def: Definition,
        /// Print the agent as JSON
        #[arg(long)]
        json: bool,
    },
    /// List agents: state, schedule, next fire time, last run
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one agent
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change an agent: only the options given change; prints a one-line confirmation
    Update {
        name: String,
        #[command(flatten)]
        def: Definition,
        /// Print the agent as JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove an agent and its handoff state (its past tasks stay)
    Rm { name: String },
    /// Stop scheduling an agent (manual runs still work)
    Pause { name: String },
    /// Schedule a paused agent again, and lift its quarantine if it has one
    Resume { name: String },
    /// Enqueue a run now and print its task id
    Run {
        name: String,
        /// Input for this run, as JSON (seen as self.input)
        #[arg(long, value_name = "JSON")]
        input: Option<String>,
        /// Print the task as JSON
        #[arg(long)]
        json: bool,
    },
    /// Show the state the next run will receive; --clear forgets it
    Handoff {
        name: String,
        #[arg(long)]
        clear: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct Definition {
    /// Python file defining `class Agent`
    #[arg(long, conflicts_with = "command")]
    file: Option<PathBuf>,
    /// A command line, e.g. '/usr/bin/env python3 job.py --fast'
    #[arg(long)]
    command: Option<String>,
    /// The agent's own config, a JSON object: what Agent(config) receives on every run (a
    /// command finds it as "config" in its input). Replaces the current one on update
    #[arg(long, value_name = "JSON", conflicts_with = "config_file")]
    config: Option<String>,
    /// The agent's own config from a JSON file
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Cron schedule: 5 fields (minute hour day month weekday) or 6 (seconds first)
    #[arg(long)]
    schedule: Option<String>,
    /// Remove the schedule (update only)
    #[arg(long, conflicts_with = "schedule")]
    no_schedule: bool,
    /// IANA time zone of the schedule [default: UTC]
    #[arg(long)]
    timezone: Option<String>,
    /// Time limit of a run, 1s to 24h [default: executor.default_timeout_s]
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Retries after a failed run [default: bulk.retry_attempts]
    #[arg(long)]
    max_retries: Option<u32>,
    /// Memory limit, 16 to 65536 MB [default: executor.max_memory_mb]
    #[arg(long)]
    memory_mb: Option<u64>,
    /// CPU share, 1 to 100 percent [default: executor.max_cpu_percent]
    #[arg(long)]
    cpu_percent: Option<u32>,
    /// Environment variable for the agent, K=V (repeatable)
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// A run due while the previous one runs: skip (default), queue or allow
    #[arg(long)]
    overlap: Option<Overlap>,
    /// allow (default: the host's network) or none (no connection leaves the run)
    #[arg(long)]
    network: Option<harness::executor::Network>,
    /// A requirements.txt for a Python agent: its runs use a virtual environment with these
    /// installed (built now, and on each host at first use; cached by hash)
    #[arg(long, value_name = "FILE")]
    requirements: Option<std::path::PathBuf>,
    /// Drop the agent's requirements (runs use executor.python)
    #[arg(long, conflicts_with = "requirements")]
    no_requirements: bool,
    /// The queue its runs wait in [default: default]: only replicas serving it run them
    #[arg(long)]
    queue: Option<String>,
}

impl Definition {
    fn runtime(&self) -> anyhow::Result<Option<Runtime>> {
        if let Some(f) = &self.file {
            let code =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            return Ok(Some(Runtime::Python { code }));
        }
        if let Some(c) = &self.command {
            let argv = shlex::split(c).filter(|a| !a.is_empty()).ok_or_else(|| {
                anyhow::anyhow!("invalid command: {c:?} is empty or has unbalanced quotes")
            })?;
            return Ok(Some(Runtime::Command { argv }));
        }
        Ok(None)
    }

    /// The agent's own config, when --config or --config-file gives one.
    fn own_config(&self) -> anyhow::Result<Option<AgentOwnConfig>> {
        let (raw, from) = match (&self.config, &self.config_file) {
            (Some(raw), _) => (raw.clone(), "--config".to_string()),
            (None, Some(f)) => (
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
                format!("--config-file {}", f.display()),
            ),
            (None, None) => return Ok(None),
        };
        match serde_json::from_str::<Value>(&raw) {
            Ok(Value::Object(m)) => Ok(Some(m)),
            Ok(other) => bail!(
                "{from} must be a JSON object (e.g. '{{\"name\": \"Ada\"}}'), not {}",
                harness::db::text::json_type(&other)
            ),
            Err(e) => bail!("{from} is not valid JSON: {e}"),
        }
    }

    fn apply(&self, mut config: AgentSettings) -> anyhow::Result<AgentSettings> {
        if let Some(s) = &self.schedule {
            config.schedule = Some(s.clone());
        }
        if self.no_schedule {
            config.schedule = None;
        }
        if let Some(tz) = &self.timezone {
            config.timezone = Some(tz.clone());
        }
        if let Some(t) = self.timeout {
            if t.subsec_nanos() != 0 {
                bail!("invalid timeout: whole seconds only, from 1s to 24h");
            }
            config.timeout = t.as_secs();
        }
        if let Some(n) = self.max_retries {
            config.max_retries = n;
        }
        if let Some(m) = self.memory_mb {
            config.memory_mb = m;
        }
        if let Some(p) = self.cpu_percent {
            config.cpu_percent = p;
        }
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("invalid env: {kv:?} must be KEY=VALUE"))?;
            config.env.insert(k.to_string(), v.to_string());
        }
        if let Some(o) = self.overlap {
            config.overlap = o;
        }
        if let Some(n) = self.network {
            config.network = n;
        }
        if let Some(f) = &self.requirements {
            config.requirements = Some(
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            );
        }
        if self.no_requirements {
            config.requirements = None;
        }
        if let Some(q) = &self.queue {
            config.queue = (q != harness::queue::DEFAULT_QUEUE).then(|| q.clone());
        }
        Ok(config)
    }
}

fn runtime_text(a: &harness::agents::Agent) -> String {
    match &a.runtime {
        Runtime::Python { .. } => "python".to_string(),
        Runtime::Command { argv } => format!(
            "command {}",
            shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_default()
        ),
    }
}

fn time_text(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map_or("-".to_string(), |t| {
        t.format("%Y-%m-%d %H:%M:%S").to_string()
    })
}

fn schedule_text(a: &harness::agents::Agent) -> String {
    match (&a.settings.schedule, &a.settings.timezone) {
        (Some(s), Some(tz)) => format!("{s} ({tz})"),
        (Some(s), None) => s.clone(),
        (None, _) => "-".to_string(),
    }
}

/// What `add` and `update` print: the name, id, runtime and the next fire time.
fn confirmation(verb: &str, a: &harness::agents::Agent) -> String {
    format!("{verb} agent {}", summary(a))
}

/// An agent in one line: name, id, runtime, schedule, next fire time.
fn summary(a: &harness::agents::Agent) -> String {
    let next = match (a.active, a.next_fire()) {
        (false, _) => "paused".to_string(),
        (true, Some(t)) => format!("next run {}", t.to_rfc3339()),
        (true, None) => "no schedule (run it with `harness agents run`)".to_string(),
    };
    format!(
        "{} (id {}): {}, schedule {}; {next}",
        a.name,
        a.id,
        runtime_text(a),
        schedule_text(a)
    )
}

fn agent_json(a: &harness::agents::Agent) -> Value {
    let mut v = serde_json::to_value(a).expect("agent serialises");
    v["next_fire_at"] = json!(a.next_fire());
    v
}

pub async fn run(cfg: Config, args: AgentsArgs) -> anyhow::Result<()> {
    let executor = Arc::new(Executor::new(&cfg.executor)?);
    let database = open_migrated(&cfg, IfAbsent::Refuse).await?;
    let agents = Agents::new(database.pool.clone(), executor);
    let result = run_command(&cfg, &agents, &database.pool, args.command).await;
    database.close().await;
    result
}

async fn run_command(
    cfg: &Config,
    agents: &Agents,
    pool: &sqlx::PgPool,
    command: AgentsCommand,
) -> anyhow::Result<()> {
    match command {
        AgentsCommand::Add { name, def, json } => {
            let Some(runtime) = def.runtime()? else {
                bail!(
                    "give the agent's code with --file agent.py or a program with --command '<argv>'"
                );
            };
            let settings = def.apply(AgentSettings::defaults(cfg))?;
            let config = def.own_config()?.unwrap_or_default();
            let agent = agents
                .create(AgentSpec {
                    name,
                    runtime,
                    settings,
                    config,
                })
                .await?;
            if json {
                println!("{}", serde_json::to_string(&agent_json(&agent))?);
            } else {
                println!("{}", confirmation("added", &agent));
            }
        }
        AgentsCommand::List { json } => list(agents, pool, json).await?,
        AgentsCommand::Show { name, json } => show(agents, &name, json).await?,
        AgentsCommand::Update { name, def, json } => {
            let current = agents.get(&name).await?;
            let runtime = def.runtime()?.unwrap_or_else(|| current.runtime.clone());
            let settings = def.apply(current.settings.clone())?;
            let config = def.own_config()?.unwrap_or_else(|| current.config.clone());
            let agent = agents.update(&name, runtime, settings, config).await?;
            if json {
                println!("{}", serde_json::to_string(&agent_json(&agent))?);
            } else {
                println!("{}", confirmation("updated", &agent));
            }
        }
        AgentsCommand::Rm { name } => {
            agents.remove(&name).await?;
            println!("removed agent {name}");
        }
        AgentsCommand::Pause { name } => {
            agents.set_active(&name, false).await?;
            println!("paused agent {name}");
        }
        AgentsCommand::Resume { name } => {
            let agent = agents.set_active(&name, true).await?;
            if agents.lift_quarantine(&agent).await? {
                println!("resumed agent {name} and lifted its quarantine");
            } else {
                println!("resumed agent {name}");
            }
        }
        AgentsCommand::Run { name, input, json } => {
            let input = match input {
                Some(raw) => serde_json::from_str(&raw)
                    .map_err(|e| anyhow::anyhow!("--input is not valid JSON: {e}"))?,
                None => Value::Null,
            };
            let queue = Queue::new(pool.clone(), cfg.bulk.retry_attempts);
            let e = agents.run(&queue, &name, input).await?;
            super::warn_if_no_replica(cfg, pool).await;
            warn_if_skipped(agents, &queue, &name, e.id).await?;
            if json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                println!(
                    "enqueued run of agent {name} as task {} ({}); follow it with `harness logs {} \
                     --follow`",
                    e.id, e.status, e.id
                );
            }
        }
        AgentsCommand::Handoff { name, clear, json } => handoff(agents, &name, clear, json).await?,
    }
    Ok(())
}

/// Says so on stderr when the run just enqueued will be skipped: its agent's overlap rule
/// is `skip` and a run of it is running now.
async fn warn_if_skipped(
    agents: &Agents,
    queue: &Queue,
    name: &str,
    id: i64,
) -> anyhow::Result<()> {
    let agent = agents.get(name).await?;
    if agent.settings.overlap != Overlap::Skip {
        return Ok(());
    }
    let running = queue
        .list(&harness::queue::TaskFilter {
            status: Some(harness::queue::Status::Running),
            kind: Some(harness::agents::AGENT_KIND.to_string()),
            agent_id: Some(agent.id),
            // This run may be one of them already (claimed at once).
            before: None,
            after: None,
            limit: 2,
            offset: 0,
        })
        .await?;
    if let Some(r) = running.iter().find(|r| r.id != id) {
        eprintln!(
            "warning: agent {name} is running now (task {}) and its overlap rule is skip, so \
             this run (task {id}) will be skipped unless that one ends first; use \
             `harness agents update {name} --overlap queue` to wait instead",
            r.id
        );
    }
    Ok(())
}

async fn list(agents: &Agents, pool: &sqlx::PgPool, json: bool) -> anyhow::Result<()> {
    let list = agents.list().await?;
    let ids: Vec<i64> = list.iter().map(|a| a.id).collect();
    let queue = Queue::new(pool.clone(), 0);
    let last = queue.last_runs(harness::agents::AGENT_KIND, &ids).await?;
    let quarantines = harness::fleet::quarantines::active(pool).await?;
    let quarantine =
        |a: &harness::agents::Agent| quarantines.iter().find(|q| q.agent_id == Some(a.id));
    let last_run = |a: &harness::agents::Agent| {
        last.get(&a.id)
            .map(|(s, at)| json!({"status": s, "at": at}))
            .unwrap_or(Value::Null)
    };
    if json {
        let v: Vec<Value> = list
            .iter()
            .map(|a| {
                let mut v = agent_json(a);
                v["last_run"] = last_run(a);
                v["quarantine"] = json!(quarantine(a));
                v
            })
            .collect();
        println!("{}", serde_json::to_string(&v)?);
    } else if list.is_empty() {
        println!("no agents; add one with `harness agents add <name> --file agent.py`");
    } else {
        let mut t = Table::new(&[
            "NAME", "STATE", "SCHEDULE", "NEXT RUN", "LAST RUN", "RUNTIME",
        ]);
        for a in &list {
            let last = last
                .get(&a.id)
                .map_or("-".to_string(), |(s, at)| format!("{s} {}", time_text(*at)));
            t.row(vec![
                a.name.clone(),
                match (a.active, quarantine(a)) {
                    (_, Some(q)) if q.held => "quarantined (held)".to_string(),
                    (_, Some(q)) => format!("quarantined until {}", q.until.format("%H:%M:%S")),
                    (true, None) => "active".to_string(),
                    (false, None) => "paused".to_string(),
                },
                schedule_text(a),
                time_text(a.next_fire()),
                last,
                runtime_text(a),
            ]);
        }
        t.print();
    }
    Ok(())
}

async fn show(agents: &Agents, name: &str, json: bool) -> anyhow::Result<()> {
    let a = agents.get(name).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&agent_json(&a))?);
    } else {
        println!("{}", summary(&a));
        println!("settings: {}", serde_json::to_string_pretty(&a.settings)?);
        println!("config: {}", serde_json::to_string_pretty(&a.config)?);
        if let Runtime::Python { code } = &a.runtime {
            println!("--- code ---\n{code}");
        }
    }
    Ok(())
}

/// Shows (or with `clear`, removes) an agent's handoff artifact.
async fn handoff(agents: &Agents, name: &str, clear: bool, json: bool) -> anyhow::Result<()> {
    let a = agents.get(name).await?;
    let manager = agents.handoffs();
    if clear {
        let n = manager.clear_artifact(a.id).await?;
        println!("cleared {n} handoff artifact(s) of agent {name}");
        return Ok(());
    }
    match manager.load_artifact(a.id).await? {
        None if json => println!("null"),
        None => println!("agent {name} has no handoff yet (it has not completed a run)"),
        Some(h) if json => println!("{}", h.to_json()),
        Some(h) => {
            println!("run #{} at {}", h.run_number, h.created_at.to_rfc3339());
            if let Some(s) = &h.summary {
                println!("summary: {s}");
            }
            if h.compressed {
                println!("(state was compressed to fit)");
            }
            println!("{}", serde_json::to_string_pretty(&h.state)?);
        }
    }
    Ok(())
}
