//! `harness queues [list|pause|resume]`: named queues, their backlog, the replicas serving
//! them, and their fleet-wide pause.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Args, Subcommand};

use harness::Config;
use harness::db::IfAbsent;
use harness::queue::queues;

use super::table::Table;
use super::{FileArg, open_migrated};

#[derive(Debug, Args)]
pub struct QueuesArgs {
    #[command(subcommand)]
    command: Option<QueuesCommand>,
    /// Print JSON instead of a table (list)
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub file: FileArg,
}

#[derive(Debug, Subcommand)]
enum QueuesCommand {
    /// Every queue with tasks or a pause on record: runnable, delayed, running, paused, and
    /// the live replicas serving it with their capacity (the default)
    List,
    /// Stop every replica from claiming tasks of the queue (running ones go on) until resumed
    Pause {
        /// The queue's name
        name: String,
        /// Why, shown by `harness queues`
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Let every replica serving the queue claim from it again, at once
    Resume {
        /// The queue's name
        name: String,
    },
}

pub async fn run(cfg: Config, args: QueuesArgs) -> anyhow::Result<()> {
    let database = open_migrated(&cfg, IfAbsent::Refuse).await?;
    let pool = &database.pool;
    let result = match args.command.unwrap_or(QueuesCommand::List) {
        QueuesCommand::List => list(&cfg, pool, args.json).await,
        QueuesCommand::Pause { name, reason } => queues::pause(pool, &name, &reason)
            .await
            .map(|changed| {
                if changed {
                    println!("paused queue {name}: no replica claims from it until it is resumed");
                } else {
                    println!("queue {name} was already paused");
                }
            })
            .map_err(Into::into),
        QueuesCommand::Resume { name } => queues::resume(pool, &name)
            .await
            .map(|changed| {
                if changed {
                    println!("resumed queue {name}");
                } else {
                    println!("queue {name} was not paused");
                }
            })
            .map_err(Into::into),
    };
    database.close().await;
    result
}

async fn list(cfg: &Config, pool: &sqlx::PgPool, json: bool) -> anyhow::Result<()> {
    let max_age = Duration::from_secs(cfg.persistence.rescue_after_s);
    let listed = harness::fleet::serving::queues(pool, max_age).await?;
    if json {
        println!("{}", serde_json::to_string(&listed)?);
        return Ok(());
    }
    if listed.is_empty() {
        println!("no queues yet: tasks go to `default` unless they name one");
        return Ok(());
    }
    let mut t = Table::new(&[
        "QUEUE",
        "STATE",
        "RUNNABLE",
        "DELAYED",
        "RUNNING",
        "SERVED BY",
    ]);
    for l in listed {
        let q = &l.queue;
        let state = match (q.paused, q.reason.is_empty()) {
            (false, _) => "running".to_string(),
            (true, true) => "paused".to_string(),
            (true, false) => format!("paused: {}", q.reason),
        };
        let served = if l.served_by.is_empty() {
            "no live replica".to_string()
        } else {
            served(&l.served_by)
        };
        t.row(vec![
            q.name.clone(),
            state,
            q.runnable.to_string(),
            q.delayed.to_string(),
            q.running.to_string(),
            served,
        ]);
    }
    t.print();
    Ok(())
}

/// `a:8 b:1`: names with a capacity each.
pub(super) fn served(m: &BTreeMap<String, i64>) -> String {
    if m.is_empty() {
        return "-".to_string();
    }
    m.iter()
        .map(|(k, n)| format!("{k}:{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}
