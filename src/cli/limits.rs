//! `harness limits [list|set|rm]`: fleet-wide concurrency and rate limits of queues, kinds,
//! agents and concurrency keys.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use std::collections::HashMap;

use harness::Config;
use harness::db::IfAbsent;
use harness::queue::limits::{self, Limit, Scope};

use super::table::Table;
use super::{FileArg, open_migrated};

#[derive(Debug, Args)]
pub struct LimitsArgs {
    #[command(subcommand)]
    command: Option<LimitsCommand>,
    /// Print JSON instead of a table (list)
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub file: FileArg,
}

#[derive(Debug, Subcommand)]
enum LimitsCommand {
    /// Every limit, with its tasks running fleet-wide and the due tasks it holds back now
    /// (the default)
    List,
    /// Add or change a limit: TARGET is queue:NAME, kind:KIND, agent:NAME or key:KEY (key:*
    /// limits each concurrency key on its own)
    Set {
        target: String,
        /// At most this many of its tasks running at once, fleet-wide
        #[arg(long)]
        concurrency: Option<i32>,
        /// At most this many starts per interval, fleet-wide: 20/s, 60/min, 1000/h, 5/30s
        #[arg(long)]
        rate: Option<String>,
    },
    /// Remove a limit (its tasks are claimed as others are, at once)
    Rm { target: String },
}

pub async fn run(cfg: Config, args: LimitsArgs) -> anyhow::Result<()> {
    let database = open_migrated(&cfg, IfAbsent::Refuse).await?;
    let pool = database.pool.clone();
    let result = async {
        match args.command.unwrap_or(LimitsCommand::List) {
            LimitsCommand::List => list(&pool, args.json).await,
            LimitsCommand::Set {
                target,
                concurrency,
                rate,
            } => {
                let (scope, target) = parse_target(&pool, &target).await?;
                let (rate, per_ms) = match rate {
                    Some(r) => {
                        let (n, ms) =
                            limits::parse_rate(&r).map_err(|e| anyhow::anyhow!("--rate: {e}"))?;
                        (Some(n), Some(ms))
                    }
                    None => (None, None),
                };
                let limit = Limit {
                    scope,
                    target,
                    concurrency,
                    rate,
                    per_ms,
                };
                limits::set(&pool, &limit).await?;
                let names = agent_names(&pool, [&limit]).await?;
                println!("limit set: {}", describe(&limit, &names));
                Ok(())
            }
            LimitsCommand::Rm { target: named } => {
                let (scope, target) = parse_target(&pool, &named).await?;
                if !limits::remove(&pool, scope, &target).await? {
                    bail!("no limit on {named}");
                }
                println!("limit on {named} removed");
                Ok(())
            }
        }
    }
    .await;
    database.close().await;
    result
}

/// `queue:heavy` → (Queue, "heavy"); `agent:NAME` → (Agent, its id).
async fn parse_target(pool: &sqlx::PgPool, s: &str) -> anyhow::Result<(Scope, String)> {
    let (scope, target) = limits::parse_target(s).map_err(anyhow::Error::msg)?;
    if scope == Scope::Agent {
        let id = harness::agents::id_of(pool, target)
            .await
            .with_context(|| format!("no agent {target:?} (`harness agents list`)"))?;
        return Ok((scope, id.to_string()));
    }
    Ok((scope, target.to_string()))
}

/// The names of the agents that agent limits among `limits` name by id.
pub(super) async fn agent_names<'a>(
    pool: &sqlx::PgPool,
    limits: impl IntoIterator<Item = &'a Limit>,
) -> anyhow::Result<HashMap<i64, String>> {
    let ids: Vec<i64> = limits
        .into_iter()
        .filter(|l| l.scope == Scope::Agent)
        .filter_map(|l| l.target.parse().ok())
        .collect();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(harness::agents::names_of(pool, &ids).await?)
}

/// Every limit with its counts, and the names of the agents they name (for [`target_text`]).
pub(super) async fn listed(
    pool: &sqlx::PgPool,
) -> anyhow::Result<(Vec<limits::LimitInfo>, HashMap<i64, String>)> {
    let all = limits::list(pool).await?;
    let names = agent_names(pool, all.iter().map(|i| &i.limit)).await?;
    Ok((all, names))
}

/// `queue:heavy`, `agent:llm` (an agent by its name while it exists, else by its id).
pub(super) fn target_text(l: &Limit, names: &HashMap<i64, String>) -> String {
    let name = (l.scope == Scope::Agent)
        .then(|| l.target.parse::<i64>().ok().and_then(|id| names.get(&id)))
        .flatten();
    format!("{}:{}", l.scope.as_str(), name.unwrap_or(&l.target))
}

/// `kind:llm, at most 3 running, at most 20 starts per 1s`.
pub(super) fn describe(l: &Limit, names: &HashMap<i64, String>) -> String {
    let mut parts = vec![target_text(l, names)];
    if let Some(c) = l.concurrency {
        parts.push(format!("at most {c} running"));
    }
    if let (Some(r), Some(p)) = (l.rate, l.per_ms) {
        parts.push(format!("at most {r} starts per {}", per_text(p)));
    }
    parts.join(", ")
}

fn per_text(ms: i64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms as u64)).to_string()
}

async fn list(pool: &sqlx::PgPool, json: bool) -> anyhow::Result<()> {
    let (all, names) = listed(pool).await?;
    if json {
        println!("{}", serde_json::to_string(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no limits (add one with `harness limits set queue:NAME --concurrency 3`)");
        return Ok(());
    }
    let mut t = Table::new(&["TARGET", "CONCURRENCY", "RATE", "RUNNING", "HELD BACK"]);
    for i in all {
        let l = &i.limit;
        t.row(vec![
            target_text(l, &names),
            l.concurrency.map_or("-".into(), |c| c.to_string()),
            match (l.rate, l.per_ms) {
                (Some(r), Some(p)) => format!("{r}/{}", per_text(p)),
                _ => "-".into(),
            },
            i.running.to_string(),
            i.waiting.to_string(),
        ]);
    }
    t.print();
    Ok(())
}
