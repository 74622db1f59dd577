//! `harness tasks …` (list, cancel, retry, rm) and `harness logs <task> [--follow]`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::json;

use harness::Config;
use harness::db::IfAbsent;
use harness::executor::output::{Progress, Stream, skipped_marker};
use harness::queue::logs::{FollowStep, Follower, LogChunk, TaskLogs};
use harness::queue::{Queue, Status, Task, TaskFilter};

use super::table::Table;
use super::{FileArg, open_migrated};

#[derive(Debug, Args)]
pub struct TasksArgs {
    #[command(subcommand)]
    command: TasksCommand,
    #[command(flatten)]
    pub file: FileArg,
}

#[derive(Debug, Subcommand)]
enum TasksCommand {
    /// List tasks, newest first
    List {
        /// Only tasks in this status (pending, running, completed, failed, timeout,
        /// retry_scheduled, cancelled)
        #[arg(long)]
        status: Option<String>,
        /// Only tasks of this kind
        #[arg(long)]
        kind: Option<String>,
        /// Only runs of this agent (its name)
        #[arg(long)]
        agent: Option<String>,
        /// At most this many, 1 to 100
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Cancel a waiting task, or ask the replica running it to abort it
    Cancel { id: i64 },
    /// Enqueue a new task like a failed or timed-out one
    Retry {
        id: i64,
        /// Print the new task as JSON
        #[arg(long)]
        json: bool,
    },
    /// Delete a task and its output for good (not while it runs: cancel it first)
    Rm { id: i64 },
}

/// `harness logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The task id
    pub task_id: i64,
    /// Keep printing output as the task produces it, until it ends; exits 0 if it
    /// completed, 1 if not
    #[arg(short, long)]
    pub follow: bool,
    /// Print JSON (without --follow: the whole record; with it: one JSON object per line)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub file: FileArg,
}

pub async fn run(cfg: Config, args: TasksArgs) -> anyhow::Result<()> {
    let database = open_migrated(&cfg, IfAbsent::Refuse).await?;
    let queue = Queue::new(database.pool.clone(), cfg.bulk.retry_attempts);
    let result = run_command(&queue, &database.pool, args.command).await;
    database.close().await;
    result
}

async fn run_command(
    queue: &Queue,
    pool: &sqlx::PgPool,
    command: TasksCommand,
) -> anyhow::Result<()> {
    match command {
        TasksCommand::List {
            status,
            kind,
            agent,
            limit,
            json,
        } => {
            if !(1..=100).contains(&limit) {
                bail!("invalid --limit: {limit} is out of range; allowed 1 to 100");
            }
            let status = match status {
                Some(s) => Some(Status::parse(&s).ok_or_else(|| {
                    anyhow::anyhow!(
                        "invalid --status: {s:?}; allowed {}",
                        Status::ALL.map(Status::as_str).join(", ")
                    )
                })?),
                None => None,
            };
            let agent_id = match &agent {
                Some(name) => Some(harness::agents::id_of(pool, name).await.map_err(|_| {
                    anyhow::anyhow!("no agent named {name:?}; `harness agents list` lists them")
                })?),
                None => None,
            };
            let tasks = queue
                .list(&TaskFilter {
                    status,
                    kind,
                    agent_id,
                    before: None,
                    after: None,
                    limit,
                    offset: 0,
                })
                .await?;
            if json {
                println!("{}", serde_json::to_string(&tasks)?);
            } else if tasks.is_empty() {
                println!("no tasks match");
            } else {
                print_tasks(pool, &tasks).await?;
            }
        }
        TasksCommand::Cancel { id } => match queue.cancel(id).await? {
            Status::Running => println!(
                "asked the replica running task {id} to abort it; it ends `cancelled` shortly"
            ),
            s => println!("task {id} is {s}"),
        },
        TasksCommand::Retry { id, json } => {
            let t = queue.retry(id).await?;
            if json {
                println!("{}", serde_json::to_string(&t)?);
            } else {
                println!("retrying task {id} as task {} ({})", t.id, t.status);
            }
        }
        TasksCommand::Rm { id } => {
            queue.delete(id).await?;
            println!("deleted task {id} and its output");
        }
    }
    Ok(())
}

async fn print_tasks(pool: &sqlx::PgPool, tasks: &[Task]) -> anyhow::Result<()> {
    let ids: Vec<i64> = tasks.iter().filter_map(|t| t.agent_id).collect();
    let names = harness::agents::names_of(pool, &ids).await?;
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or("-".to_string(), |t| {
            t.format("%Y-%m-%d %H:%M:%S").to_string()
        })
    };
    let mut table = Table::new(&[
        "ID", "KIND", "AGENT", "STATUS", "ATTEMPT", "CREATED", "ENDED", "ERROR",
    ]);
    for t in tasks {
        let error = t
            .error
            .as_deref()
            .map(|e| {
                let line = e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
                line.chars().take(60).collect::<String>()
            })
            .unwrap_or_default();
        table.row(vec![
            t.id.to_string(),
            t.kind.clone(),
            t.agent_id
                .map(|a| names.get(&a).cloned().unwrap_or_else(|| format!("#{a}")))
                .unwrap_or_else(|| "-".to_string()),
            t.status.to_string(),
            format!("{}/{}", t.attempt, t.max_retries + 1),
            time(Some(t.created_at)),
            time(t.completed_at),
            error,
        ]);
    }
    table.print();
    Ok(())
}

/// `harness logs`: what the task printed (stdout to stdout, stderr and progress to stderr),
/// or with `--follow` as it prints it.
pub async fn logs(cfg: Config, args: LogsArgs) -> anyhow::Result<ExitCode> {
    let database = open_migrated(&cfg, IfAbsent::Refuse).await?;
    let queue = Queue::new(database.pool.clone(), cfg.bulk.retry_attempts);
    let result = if args.follow {
        follow(&queue, args.task_id, args.json).await
    } else {
        show(&queue, args.task_id, args.json).await
    };
    database.close().await;
    result
}

async fn show(queue: &Queue, id: i64, json: bool) -> anyhow::Result<ExitCode> {
    let task = queue.get(id).await?;
    let mut chunks = Vec::new();
    let mut after = None;
    loop {
        let page = queue.logs(id, after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = Some((last.attempt, last.seq));
        chunks.extend(page);
    }
    if json {
        let logs = TaskLogs {
            task_id: id,
            status: task.status,
            attempt: task.attempt,
            progress: queue.progress(id).await?,
            chunks,
            next: None,
        };
        println!("{}", serde_json::to_string(&logs)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut printer = Printer::default();
    printer.print(&chunks, task.attempt > 1)?;
    if chunks.is_empty() {
        eprintln!("task {id} has no output stored");
    }
    if task.status.is_final() {
        eprintln!("{}", ending(&task));
    } else {
        eprintln!(
            "task {id} is {} (attempt {}); `harness logs {id} --follow` keeps watching",
            task.status, task.attempt
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn follow(queue: &Queue, id: i64, json: bool) -> anyhow::Result<ExitCode> {
    // Exists? (a typo should not wait for ever)
    let first = queue.get(id).await?;
    let mut follower = Follower::new(queue.clone(), id, None);
    let mut printer = Printer::default();
    loop {
        match follower.next().await? {
            FollowStep::Chunks(chunks) => {
                if json {
                    for c in &chunks {
                        println!("{}", serde_json::to_string(c)?);
                    }
                } else {
                    printer.print(&chunks, first.attempt > 1 || printer.attempt.is_some())?;
                }
            }
            FollowStep::End(task) => {
                if json {
                    println!(
                        "{}",
                        json!({"end": {"status": task.status, "attempt": task.attempt,
                                       "error": task.error}})
                    );
                } else {
                    eprintln!("{}", ending(&task));
                }
                return Ok(if task.status == Status::Completed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
        }
    }
}

/// The last line of `harness logs`: how the task ended.
fn ending(task: &Task) -> String {
    match (&task.status, &task.error) {
        (Status::Completed, _) => format!("task {} completed", task.id),
        (s, Some(e)) => {
            let last = e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            format!("task {} {s}: {last}", task.id)
        }
        (s, None) => format!("task {} {s}", task.id),
    }
}

/// Writes chunks where they belong, with a line for each attempt after the first and a
/// marker where bytes were skipped.
#[derive(Default)]
struct Printer {
    attempt: Option<i32>,
}

impl Printer {
    fn print(&mut self, chunks: &[LogChunk], several_attempts: bool) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        let mut err = std::io::stderr().lock();
        for c in chunks {
            if self.attempt != Some(c.attempt) {
                if several_attempts || self.attempt.is_some() {
                    out.flush()?;
                    writeln!(err, "--- attempt {} ---", c.attempt)?;
                }
                self.attempt = Some(c.attempt);
            }
            match c.stream {
                Stream::Progress => {
                    out.flush()?;
                    if let Ok(p) = serde_json::from_str::<Progress>(&c.text) {
                        writeln!(err, "[progress{}]", progress_text(&p))?;
                    }
                }
                Stream::Stdout | Stream::Stderr => {
                    let w: &mut dyn Write = if c.stream == Stream::Stdout {
                        &mut out
                    } else {
                        out.flush()?;
                        &mut err
                    };
                    if c.skipped > 0 {
                        write!(w, "{}", skipped_marker(c.skipped as u64))?;
                    }
                    write!(w, "{}", c.text)?;
                    w.flush()?;
                }
            }
        }
        out.flush()
    }
}

/// ` 40% fetched 40 pages`.
pub fn progress_text(p: &Progress) -> String {
    let mut s = String::new();
    if let Some(f) = p.fraction {
        s.push_str(&format!(" {:.0}%", f * 100.0));
    }
    if let Some(m) = &p.message {
        s.push(' ');
        s.push_str(m);
    }
    s
}
