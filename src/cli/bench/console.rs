//! `harness bench --console`: how long the web console takes to render its pages over a big
//! history, and whether rendering them reads the whole tasks table.
//!
//! On a fresh database (`harness_bench_console_<pid>`, dropped at the end, also on an error or
//! Ctrl-C, unless `--keep`) it seeds what a busy fleet leaves behind: `--agents` Python agents
//! on a five-minute schedule with their handoffs, `--tasks` tasks over the last seven days
//! (see [`harness::queue::SyntheticHistory`]), an hour of health metrics of three replicas and
//! governance events. One real `harness serve` then serves the console on a loopback port,
//! without tokens; each page of [`pages`] is requested [`WARM_UP`] times, then `--runs` times
//! in a row, each whole response timed and required to be `200 OK`.
//!
//! Around each page's requests it reads how the tasks table was read (pg_stat_user_tables),
//! `--stats-wait` after the last request, once the replica's sessions have published their
//! counts. A parallel scan counts once per process taking part (the leader and each worker),
//! so the rows read say more than the scans. The replica's own work (its governor's
//! queue-depth queries, the claimer's polls) runs throughout and is counted with the pages; a
//! window of [`QUIET_WINDOW`] with no request measures it on its own, and `rows_per_request`
//! is a page's rows less that rate: within about one background query's rows divided by
//! `--runs` of the truth, as the background's queries land in one window or the next.
//!
//! While it measures, the benchmark holds the scheduler's leader lock, so that the replica
//! never fires the agents' schedules: agent runs would load the machine being measured.
//! It measures; it changes no page.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use sqlx::{ConnectOptions, Connection};

use harness::Config;
use harness::config::redact_url;
use harness::db::{self, Database};
use harness::queue::{self, TableReads};

/// Tasks of the history unless --tasks says otherwise: the console's target size.
pub const DEFAULT_TASKS: usize = 1_000_000;
/// Timed requests per page unless --runs says otherwise.
pub const DEFAULT_RUNS: usize = 50;
/// Untimed requests per page first: connections, caches and plans warm.
const WARM_UP: usize = 3;
/// How far back the history reaches.
const HISTORY_SPAN: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the replica is watched with no request, for its own reads of the tasks table.
const QUIET_WINDOW: Duration = Duration::from_secs(30);
/// Handoffs kept per agent.
const HANDOFFS_PER_AGENT: i64 = 10;
/// The health history: replicas, how far back, how often each wrote a metrics row, and how
/// many governance events they recorded.
const HEALTH_REPLICAS: usize = 3;
const HEALTH_SPAN: Duration = Duration::from_secs(3600);
const HEALTH_EVERY: Duration = Duration::from_secs(10);
const HEALTH_EVENTS: i64 = 200;
/// The agents' schedule.
const AGENT_SCHEDULE: &str = "*/5 * * * *";
/// How long the replica may take to answer its readiness check.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a page may take before the benchmark gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Completed tasks are kept this long by the replica under test (its default, 7 days, would
/// start pruning the oldest of the seven-day history ten minutes in).
const RETENTION_DAYS: u32 = 30;

/// What `harness bench --console` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub tasks: usize,
    pub agents: usize,
    pub runs: usize,
    pub keep: bool,
    pub stats_wait: Duration,
    pub json: bool,
}

/// Ids and names of the seeded history that pages point at.
#[derive(Debug, Clone)]
struct Landmarks {
    /// A task in the middle of the history: a page far from the newest.
    middle_id: i64,
    /// The newest failed task, with output.
    failed_id: i64,
    /// A task with an idempotency key, `key-<id>`.
    keyed_id: i64,
    agent: String,
    rare_kind: &'static str,
}

/// The pages measured, in this order: add one here and it is measured and reported.
fn pages(l: &Landmarks) -> Vec<String> {
    vec![
        "/".to_string(),
        "/tasks".to_string(),
        "/tasks?status=failed".to_string(),
        format!("/tasks?status=completed&before={}", l.middle_id),
        format!("/tasks?kind={}", l.rare_kind),
        "/tasks?kind=email&status=timeout".to_string(),
        "/tasks?status=pending".to_string(),
        {
            // Three to two days ago: both time bounds found by bisecting ids.
            let day = |d: i64| {
                (chrono::Utc::now() - chrono::Duration::days(d))
                    .format("%Y-%m-%dT%H:%M")
                    .to_string()
            };
            format!("/tasks?kind=email&since={}&until={}", day(3), day(2))
        },
        format!("/tasks?agent={}", l.agent),
        format!("/tasks?q=key-{}", l.keyed_id),
        format!("/tasks/{}", l.failed_id),
        "/agents".to_string(),
        format!("/agents/{}", l.agent),
        "/fleet".to_string(),
    ]
}

/// Latency of one page's requests, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Latency {
    p50_ms: f64,
    p95_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn of(samples_ms: &[f64]) -> Latency {
        let mut v = samples_ms.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        Latency {
            p50_ms: round3(super::percentile(&v, 0.5)),
            p95_ms: round3(super::percentile(&v, 0.95)),
            max_ms: round3(v.last().copied().unwrap_or(0.0)),
        }
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The replica's own reads of the tasks table over a window with no request.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Background {
    window_s: f64,
    reads: TableReads,
}

impl Background {
    /// Rows the replica reads on its own in `secs`, at the rate seen.
    fn rows_in(&self, secs: f64) -> f64 {
        if self.window_s <= 0.0 {
            return 0.0;
        }
        self.reads.rows() as f64 * secs / self.window_s
    }
}

/// Rows of the tasks table one request read on average: what was read in the page's window,
/// less what the replica reads on its own in as long, shared out over the requests. `None`
/// without a measurement of the background.
fn rows_per_request(
    reads: TableReads,
    window_s: f64,
    background: Option<&Background>,
    requests: usize,
) -> Option<f64> {
    let bg = background?;
    let own = (reads.rows() as f64 - bg.rows_in(window_s)).max(0.0);
    Some((own / requests.max(1) as f64).round())
}

/// One page's figures.
#[derive(Debug, Clone, Serialize)]
struct PageReport {
    page: String,
    #[serde(flatten)]
    latency: Latency,
    /// Size of the last response's body.
    bytes: usize,
    /// From the first request to the statistics read after the last (`--stats-wait` later).
    window_s: f64,
    tasks_seq_scans: i64,
    tasks_seq_rows_read: i64,
    tasks_idx_scans: i64,
    tasks_idx_rows_fetched: i64,
    rows_per_request: Option<f64>,
}

/// The replica's own reads, as reported.
#[derive(Debug, Clone, Serialize)]
struct BackgroundReport {
    window_s: f64,
    tasks_seq_scans: i64,
    tasks_seq_rows_read: i64,
    tasks_idx_rows_fetched: i64,
}

/// The whole measurement.
#[derive(Debug, Clone, Serialize)]
struct Report {
    tasks: usize,
    agents: usize,
    runs: usize,
    warm_up: usize,
    seed_s: f64,
    pages: Vec<PageReport>,
    worst_p95_ms: f64,
    worst_page: String,
    /// Over every page's window.
    tasks_seq_scans: i64,
    tasks_seq_rows_read: i64,
    tasks_idx_rows_fetched: i64,
    background: Option<BackgroundReport>,
    stats_wait_s: f64,
    cpus: usize,
    /// The database, when kept (`--keep`).
    database: Option<String>,
}

impl Report {
    fn new(
        o: &Options,
        seed_s: f64,
        pages: Vec<PageReport>,
        background: Option<&Background>,
    ) -> Report {
        let worst = pages
            .iter()
            .max_by(|a, b| a.latency.p95_ms.total_cmp(&b.latency.p95_ms));
        let (worst_p95_ms, worst_page) =
            worst.map_or((0.0, String::new()), |p| (p.latency.p95_ms, p.page.clone()));
        let sum = |f: fn(&PageReport) -> i64| pages.iter().map(f).sum::<i64>();
        Report {
            tasks: o.tasks,
            agents: o.agents,
            runs: o.runs,
            warm_up: WARM_UP,
            seed_s: (seed_s * 10.0).round() / 10.0,
            worst_p95_ms,
            worst_page,
            tasks_seq_scans: sum(|p| p.tasks_seq_scans),
            tasks_seq_rows_read: sum(|p| p.tasks_seq_rows_read),
            tasks_idx_rows_fetched: sum(|p| p.tasks_idx_rows_fetched),
            background: background.map(|b| BackgroundReport {
                window_s: (b.window_s * 10.0).round() / 10.0,
                tasks_seq_scans: b.reads.seq_scans,
                tasks_seq_rows_read: b.reads.seq_rows,
                tasks_idx_rows_fetched: b.reads.idx_rows,
            }),
            pages,
            stats_wait_s: o.stats_wait.as_secs_f64(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            database: None,
        }
    }

    fn print(&self) {
        println!(
            "{} tasks, {} agents (seeded in {:.1} s); {} timed requests per page after {} \
             warm-up requests:",
            self.tasks, self.agents, self.seed_s, self.runs, self.warm_up
        );
        let mut t = crate::cli::table::Table::new(&[
            "PAGE",
            "P50 MS",
            "P95 MS",
            "MAX MS",
            "KB",
            "SEQ SCANS",
            "SEQ ROWS",
            "ROWS/REQUEST",
        ]);
        for p in &self.pages {
            t.row(vec![
                p.page.clone(),
                format!("{:.1}", p.latency.p50_ms),
                format!("{:.1}", p.latency.p95_ms),
                format!("{:.1}", p.latency.max_ms),
                format!("{:.0}", p.bytes as f64 / 1000.0),
                p.tasks_seq_scans.to_string(),
                p.tasks_seq_rows_read.to_string(),
                p.rows_per_request
                    .map_or("-".to_string(), |r| format!("{r:.0}")),
            ]);
        }
        t.print();
        println!(
            "worst p95: {:.1} ms ({})",
            self.worst_p95_ms, self.worst_page
        );
        println!(
            "tasks table during the pages: {} sequential scans reading {} rows; {} rows \
             fetched through indexes",
            self.tasks_seq_scans, self.tasks_seq_rows_read, self.tasks_idx_rows_fetched
        );
        match &self.background {
            Some(b) => println!(
                "the replica alone, {:.0} s without requests: {} sequential scans reading {} \
                 rows; {} rows fetched through indexes (counted in the pages' figures too)",
                b.window_s, b.tasks_seq_scans, b.tasks_seq_rows_read, b.tasks_idx_rows_fetched
            ),
            None => println!(
                "the replica's own reads were not measured (--stats-wait below {} s)",
                queue::STATS_PUBLISH_DELAY.as_secs()
            ),
        }
    }
}

pub async fn run(cfg: &Config, o: &Options) -> anyhow::Result<()> {
    if o.tasks == 0 || o.agents == 0 || o.runs == 0 {
        bail!("--tasks, --agents and --runs must be at least 1 with --console");
    }
    let database = Database::open_existing(cfg).await?;
    let admin_url = db::with_database(database.url(), "postgres");
    let name = format!("harness_bench_console_{}", std::process::id());
    db::create_database_at(&admin_url, &name).await?;
    let url = db::with_database(database.url(), &name);
    let result = tokio::select! {
        r = measure(cfg, o, &url) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    if o.keep {
        let how = match database.private_server() {
            Some(server) => server.psql_command(&name),
            None => redact_url(&url),
        };
        eprintln!("kept the benchmark database {name}: {how}");
    } else if let Err(e) = db::drop_database_at(&admin_url, &name).await {
        if result.is_ok() {
            return Err(e).context(format!("dropping the benchmark database {name}"));
        }
        eprintln!("warning: could not drop the benchmark database {name}: {e}");
    }
    database.close().await;
    let mut report = result?;
    if o.keep {
        report.database = Some(name);
    }
    if o.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        report.print();
    }
    Ok(())
}

/// Progress, on stderr (with --json too: a run takes minutes, and stdout has the report).
fn say(msg: impl std::fmt::Display) {
    eprintln!("{msg}");
}

/// Seeds the database at `url`, serves it, and measures every page.
async fn measure(cfg: &Config, o: &Options, url: &str) -> anyhow::Result<Report> {
    // Seeding statements take seconds by design: not a warning each (sqlx's slow-statement log).
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.disable_statement_logging())
        .await
        .with_context(|| format!("connecting to {}", redact_url(url)))?;
    db::migrate(&pool).await?;
    let seeding = Instant::now();
    let landmarks = seed(cfg, o, &pool).await?;
    let seed_s = seeding.elapsed().as_secs_f64();
    say(format_args!("seeded in {seed_s:.1} s"));

    let mut leader = sqlx::PgConnection::connect(url).await?;
    if !harness::scheduler::hold_leadership(&mut leader, &cfg.scheduler.namespace).await? {
        bail!("another process holds the scheduler's leader lock of the benchmark database");
    }
    let mut replica = Replica::spawn(cfg, url)?;
    // A search by key answers with a redirect to its task: the time includes following it.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::limited(2))
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    replica.ready(&client).await?;
    let pages = pages(&landmarks);
    for page in &pages {
        for _ in 0..WARM_UP {
            replica.get(&client, page).await?;
        }
    }
    say("warmed up; measuring");
    tokio::time::sleep(o.stats_wait).await;
    let mut before = queue::table_reads(&pool).await?;
    let mut since = Instant::now();
    let background = if o.stats_wait >= queue::STATS_PUBLISH_DELAY {
        say(format_args!(
            "watching the replica alone for {} s",
            QUIET_WINDOW.as_secs()
        ));
        tokio::time::sleep(QUIET_WINDOW).await;
        let now = queue::table_reads(&pool).await?;
        let b = Background {
            window_s: since.elapsed().as_secs_f64(),
            reads: now.since(before),
        };
        (before, since) = (now, Instant::now());
        Some(b)
    } else {
        None
    };
    let mut reports = Vec::with_capacity(pages.len());
    for page in &pages {
        let mut ms = Vec::with_capacity(o.runs);
        let mut bytes = 0;
        for _ in 0..o.runs {
            let t = Instant::now();
            bytes = replica.get(&client, page).await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(o.stats_wait).await;
        let now = queue::table_reads(&pool).await?;
        let window_s = since.elapsed().as_secs_f64();
        let reads = now.since(before);
        (before, since) = (now, Instant::now());
        let latency = Latency::of(&ms);
        say(format_args!(
            "{page}: p50 {:.1} ms, p95 {:.1} ms; tasks: {} sequential scans, {} rows",
            latency.p50_ms, latency.p95_ms, reads.seq_scans, reads.seq_rows
        ));
        reports.push(PageReport {
            page: page.clone(),
            latency,
            bytes,
            window_s: (window_s * 10.0).round() / 10.0,
            tasks_seq_scans: reads.seq_scans,
            tasks_seq_rows_read: reads.seq_rows,
            tasks_idx_scans: reads.idx_scans,
            tasks_idx_rows_fetched: reads.idx_rows,
            rows_per_request: rows_per_request(reads, window_s, background.as_ref(), o.runs),
        });
    }
    drop(replica);
    let _ = leader.close().await;
    pool.close().await;
    Ok(Report::new(o, seed_s, reports, background.as_ref()))
}

/// Agents with handoffs, the health history and the tasks, each through the module that
/// owns its table; returns what the pages point at.
async fn seed(cfg: &Config, o: &Options, pool: &sqlx::PgPool) -> anyhow::Result<Landmarks> {
    let mut settings = harness::agents::AgentSettings::defaults(cfg);
    settings.schedule = Some(AGENT_SCHEDULE.to_string());
    let agents = harness::agents::seed_for_bench(pool, o.agents, &settings).await?;
    let agent_ids: Vec<i64> = agents.iter().map(|a| a.0).collect();
    harness::handoff::seed_for_bench(pool, &agent_ids, HANDOFFS_PER_AGENT).await?;
    let replicas: Vec<String> = (1..=HEALTH_REPLICAS)
        .map(|i| format!("bench-replica-{i}"))
        .collect();
    harness::fleet::health::seed_for_bench(
        pool,
        &replicas,
        HEALTH_SPAN,
        HEALTH_EVERY,
        HEALTH_EVENTS,
    )
    .await?;
    let history = queue::SyntheticHistory {
        tasks: o.tasks as u64,
        agent_kind: harness::agents::AGENT_KIND.to_string(),
        agent_ids,
        span: HISTORY_SPAN,
        until: chrono::Utc::now(),
    };
    let started = Instant::now();
    let seeded = queue::seed_history(pool, &history, |done, total| {
        say(format_args!(
            "seeded {done} of {total} tasks ({:.1} s)",
            started.elapsed().as_secs_f64()
        ))
    })
    .await?;
    Ok(Landmarks {
        middle_id: seeded.first_id + (seeded.last_id - seeded.first_id) / 2,
        failed_id: seeded.failed_id.unwrap_or(seeded.last_id),
        keyed_id: seeded.keyed_id.unwrap_or(seeded.first_id),
        agent: agents[agents.len() / 2].1.clone(),
        rare_kind: queue::RARE_KIND,
    })
}

/// The `harness serve` that serves the pages, on a loopback port, without tokens; stopped
/// (SIGTERM, then SIGKILL) when dropped.
pub(super) struct Replica {
    child: Option<Child>,
    pub(super) base: String,
    /// Its stderr, shown when it fails.
    log: tempfile::NamedTempFile,
}

impl Replica {
    pub(super) fn spawn(cfg: &Config, url: &str) -> anyhow::Result<Replica> {
        let exe = std::env::current_exe().context("locating the harness binary")?;
        // A port free now; the replica binds it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free loopback port")?
            .port();
        let log = tempfile::NamedTempFile::new().context("creating the replica's log file")?;
        let mut cmd = Command::new(&exe);
        for (k, _) in std::env::vars() {
            if k.starts_with("HARNESS_") || k.starts_with("OTEL_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .arg("serve")
            .env("DATABASE_URL", url)
            .env("HARNESS_HOME", &cfg.home)
            .env("HARNESS_API__BIND", format!("127.0.0.1:{port}"))
            // The console opens without signing in (a harness.yml here may list tokens).
            .env("HARNESS_API__TOKENS", "[]")
            .env("HARNESS_SCHEDULER__NAMESPACE", &cfg.scheduler.namespace)
            .env(
                "HARNESS_PERSISTENCE__GC_COMPLETED_AFTER_DAYS",
                RETENTION_DAYS.to_string(),
            )
            // No agent runs while the benchmark holds the leader lock; run as root or not.
            .env("HARNESS_EXECUTOR__ALLOW_SHARED_USER", "true")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen()?)
            .spawn()
            .context("starting the replica")?;
        Ok(Replica {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            log,
        })
    }

    /// The end of what the replica wrote on stderr.
    pub(super) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until the replica answers `/readyz` with 200.
    pub(super) async fn ready(&mut self, client: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the replica exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            let r = client.get(format!("{}/readyz", self.base)).send().await;
            if r.is_ok_and(|r| r.status() == reqwest::StatusCode::OK) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the replica was not ready within {} s:\n{}",
                    START_TIMEOUT.as_secs(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One whole response to `GET page`, which must be 200 OK; the body's size.
    pub(super) async fn get(&self, client: &reqwest::Client, page: &str) -> anyhow::Result<usize> {
        let r = client
            .get(format!("{}{page}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {page}\n{}", self.log_tail()))?;
        let status = r.status();
        let body = r
            .bytes()
            .await
            .with_context(|| format!("reading the response to GET {page}"))?;
        if status != reqwest::StatusCode::OK {
            let start = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            bail!("GET {page} answered {status}, not 200 OK: {start}");
        }
        Ok(body.len())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        super::stop(self.child.take().into_iter().collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(seq_rows: i64, idx_rows: i64) -> TableReads {
        TableReads {
            seq_scans: 0,
            seq_rows,
            idx_scans: 0,
            idx_rows,
        }
    }

    #[test]
    fn a_pages_latency_is_its_nearest_rank_percentiles_and_its_slowest_request() {
        // 1..=100 ms in a shuffled order: p50 is the 51st (rounded rank), p95 the 95th.
        let mut samples: Vec<f64> = (1..=100).map(f64::from).collect();
        samples.reverse();
        samples.swap(3, 70);
        let l = Latency::of(&samples);
        assert_eq!(l.p50_ms, 51.0);
        assert_eq!(l.p95_ms, 95.0);
        assert_eq!(l.max_ms, 100.0);
        // Three requests: p95 is the slowest of them.
        let l = Latency::of(&[12.0, 30.5, 11.0]);
        assert_eq!((l.p50_ms, l.p95_ms, l.max_ms), (12.0, 30.5, 30.5));
    }

    #[test]
    fn a_requests_rows_leave_out_what_the_replica_reads_on_its_own_meanwhile() {
        // The replica alone: 1,000,000 rows in 10 s (say, one depth query a log interval).
        let bg = Background {
            window_s: 10.0,
            reads: reads(1_000_000, 0),
        };
        // A page whose 50 requests took a 20 s window and read 2,000,000 + 50 × 100 rows.
        let page = reads(2_000_000, 5_000);
        assert_eq!(rows_per_request(page, 20.0, Some(&bg), 50), Some(100.0));
        // Less than the background alone: nothing is the page's, never a negative count.
        assert_eq!(
            rows_per_request(reads(10, 0), 20.0, Some(&bg), 50),
            Some(0.0)
        );
        // Without a background measurement the share is unknown.
        assert_eq!(rows_per_request(page, 20.0, None, 50), None);
    }

    #[test]
    fn the_report_names_the_slowest_page_and_adds_up_the_scans() {
        let page = |name: &str, p95: f64, scans: i64| PageReport {
            page: name.to_string(),
            latency: Latency {
                p50_ms: p95 / 2.0,
                p95_ms: p95,
                max_ms: p95 * 2.0,
            },
            bytes: 1000,
            window_s: 11.0,
            tasks_seq_scans: scans,
            tasks_seq_rows_read: scans * 1_000_000,
            tasks_idx_scans: 0,
            tasks_idx_rows_fetched: 10,
            rows_per_request: None,
        };
        let o = Options {
            tasks: 1000,
            agents: 5,
            runs: 3,
            keep: false,
            stats_wait: Duration::ZERO,
            json: true,
        };
        let r = Report::new(
            &o,
            1.0,
            vec![
                page("/", 20.0, 1),
                page("/tasks", 180.0, 3),
                page("/fleet", 5.0, 0),
            ],
            None,
        );
        assert_eq!(r.worst_p95_ms, 180.0);
        assert_eq!(r.worst_page, "/tasks");
        assert_eq!(r.tasks_seq_scans, 4);
        assert_eq!(r.tasks_seq_rows_read, 4_000_000);
        assert_eq!(r.tasks_idx_rows_fetched, 30);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["pages"][1]["page"], "/tasks");
        assert_eq!(v["pages"][1]["p95_ms"], 180.0);
        assert!(v["background"].is_null());
    }

    #[test]
    fn every_page_points_at_the_seeded_history() {
        let l = Landmarks {
            middle_id: 500,
            failed_id: 990,
            keyed_id: 510,
            agent: "agent-003".to_string(),
            rare_kind: "reindex",
        };
        let p = pages(&l);
        assert_eq!(p.len(), 14);
        for want in [
            "/tasks?status=pending",
            "/tasks?status=completed&before=500",
            "/tasks?kind=reindex",
            "/tasks?agent=agent-003",
            "/tasks?q=key-510",
            "/tasks/990",
            "/agents/agent-003",
        ] {
            assert!(p.iter().any(|x| x == want), "{want} in {p:?}");
        }
        // A day's window of one kind, both bounds given.
        assert!(
            p.iter()
                .any(|x| x.starts_with("/tasks?kind=email&since=") && x.contains("&until=")),
            "{p:?}"
        );
    }
}
