//! `harness limits [list|set|rm]`: fleet-wide concurrency and rate limits of queues, kinds,
//! agents and concurrency keys.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

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
                println!("limit set: {}", describe(&limit));
                Ok(())
            }
            LimitsCommand::Rm { target } => {
                let (scope, target) = parse_target(&pool, &target).await?;
                if !limits::remove(&pool, scope, &target).await? {
                    bail!("no limit on {}:{target}", scope.as_str());
                }
                println!("limit on {}:{target} removed", scope.as_str());
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

fn describe(l: &Limit) -> String {
    let mut parts = vec![format!("{}:{}", l.scope.as_str(), l.target)];
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
    let all = limits::list(pool).await?;
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
            format!("{}:{}", l.scope.as_str(), l.target),
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
