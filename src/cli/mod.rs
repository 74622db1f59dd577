//! The `harness` subcommands. Each one loads the layered configuration, then calls the
//! library; errors are printed once, with what to do about them, and exit non-zero.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use harness::Config;
use harness::config::redact_url;
use harness::db::{self, Database};

#[derive(Debug, Parser)]
#[command(
    name = "harness",
    version,
    about = "Run user agents and background jobs 24/7 on replicas coordinated through PostgreSQL",
    long_about = "Agent Harness runs user agents (Python or any command) and background jobs on a \
fleet of identical replicas that share nothing but a PostgreSQL database.\n\n\
Settings come from built-in defaults, then a YAML file (--config, $HARNESS_CONFIG or \
./harness.yml), then HARNESS_<SECTION>__<KEY> environment variables; DATABASE_URL sets \
database.url. Without a database URL, a private PostgreSQL is started under .harness/ \
($HARNESS_HOME) from the installed server binaries."
)]
pub struct Cli {
    /// YAML configuration file [default: $HARNESS_CONFIG, else ./harness.yml when present]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a development instance: a private PostgreSQL when no DATABASE_URL is set,
    /// migrations, then run until Ctrl-C
    #[command(long_about = "Start a development instance in one command.\n\n\
With no database URL configured this starts (or joins) a private PostgreSQL under \
.harness/ ($HARNESS_HOME) from the installed server binaries, applies the migrations, \
and runs until Ctrl-C or SIGTERM. The private server stops when its last user exits.")]
    Up,
    /// Apply pending database migrations (idempotent; safe from several processes at once)
    Migrate,
    /// Print the effective configuration as YAML, with secrets redacted
    Config,
}

pub fn run(cli: Cli) -> ExitCode {
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    harness::telemetry::init_logging(cfg.telemetry.log_format);
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
            Command::Up => up(cfg).await,
            Command::Migrate => migrate(cfg).await,
            Command::Config => {
                print!("{}", cfg.to_redacted_yaml());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn open_migrated(cfg: &Config) -> anyhow::Result<Database> {
    let database = Database::open(cfg).await?;
    db::migrate(&database.pool)
        .await
        .context("applying migrations")?;
    Ok(database)
}

async fn migrate(cfg: Config) -> anyhow::Result<()> {
    let database = open_migrated(&cfg).await?;
    let count = db::MIGRATOR.iter().count();
    println!(
        "database {} is at schema version {} ({count} migrations)",
        redact_url(database.url()),
        db::MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
    );
    database.close().await;
    Ok(())
}

async fn up(cfg: Config) -> anyhow::Result<()> {
    let database = open_migrated(&cfg).await?;
    match database.private_server() {
        Some(server) => eprintln!(
            "Agent Harness is up with a private PostgreSQL under {} \
             (psql \"{}\").\nMigrations applied. Press Ctrl-C to stop.",
            server.home().display(),
            server.tcp_url(db::PRIVATE_DATABASE)
        ),
        None => eprintln!(
            "Agent Harness is up on {}.\nMigrations applied. Press Ctrl-C to stop.",
            redact_url(database.url())
        ),
    }
    shutdown_signal().await;
    eprintln!("Stopping.");
    database.close().await;
    Ok(())
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
