//! `harness doctor`: checks what a replica on this host needs, one line per check with `ok`,
//! `warn` or `FAIL` and what to do, and exits non-zero when a check fails.
//!
//! It reads and probes, never changes: no private database is set up (a home without one is
//! a warning that says how to make it), no migration is applied, the API address is bound
//! and released at once. `--json` prints the same checks for scripts.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use harness::Config;
use harness::config::{Scope, redact_url};
use harness::db::{self, Database};
use harness::executor::{self, Executor};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One check: what was looked at, how it came out, and what to do when it is not `ok`.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(check: &'static str, detail: impl Into<String>) -> Check {
        Check {
            check,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            check,
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            check,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// `FAIL python      executor.python = "/x": …; fix: …`
    fn line(&self) -> String {
        let mut line = format!(
            "{:<4}  {:<10} {}",
            self.status.label(),
            self.check,
            self.detail
        );
        if let Some(fix) = &self.fix {
            line.push_str("; fix: ");
            line.push_str(fix);
        }
        line
    }
}

pub async fn run(cfg: Config, json: bool) -> anyhow::Result<ExitCode> {
    let mut checks = executor_checks(&cfg).await;
    checks.extend(database_checks(&cfg).await);
    checks.push(bind_check(cfg.api.bind));
    checks.push(tokens_check(&cfg));
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if json {
        println!("{}", serde_json::json!({ "ok": !failed, "checks": checks }));
    } else {
        for c in &checks {
            println!("{}", c.line());
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The interpreter, the account agents run as, and the isolation: what `Executor::new` finds,
/// exactly as a replica would.
async fn executor_checks(cfg: &Config) -> Vec<Check> {
    let settings = cfg.executor.clone();
    let executor = tokio::task::spawn_blocking(move || Executor::new(&settings))
        .await
        .map_err(|e| executor::Error::RunDir(std::io::Error::other(e.to_string())));
    let executor = match executor.and_then(|r| r) {
        Ok(executor) => executor,
        Err(e) => {
            let not_checked = |check| {
                Check::warn(
                    check,
                    "not checked: the executor did not start (see the failed check)",
                    "fix the failed check",
                )
            };
            return match e {
                executor::Error::NoPython(_) => vec![
                    Check::fail(
                        "python",
                        format!("executor.python = {:?}: {e}", cfg.executor.python),
                        "set executor.python (HARNESS_EXECUTOR__PYTHON) to an interpreter the \
                         agent account can run, or install python3",
                    ),
                    not_checked("account"),
                    not_checked("isolation"),
                ],
                executor::Error::NoSuchUser(_) => vec![
                    not_checked("python"),
                    Check::fail(
                        "account",
                        format!("executor.run_as = {:?}: {e}", cfg.executor.run_as),
                        "set executor.run_as (HARNESS_EXECUTOR__RUN_AS) to an existing \
                         unprivileged account, or create it",
                    ),
                    not_checked("isolation"),
                ],
                executor::Error::UidRange(_) => vec![
                    not_checked("python"),
                    Check::fail(
                        "account",
                        format!("executor.uid_range = {:?}: {e}", cfg.executor.uid_range),
                        "give executor.uid_range (HARNESS_EXECUTOR__UID_RANGE) a block of uids \
                         no account uses, or empty it to run every agent as executor.run_as",
                    ),
                    not_checked("isolation"),
                ],
                other => vec![Check::fail(
                    "executor",
                    other.to_string(),
                    "see the message; `harness exec` shows the same",
                )],
            };
        }
    };
    let mut checks = vec![python_check(&executor).await];
    let account = match (
        executor.isolation.uid_per_run,
        executor.isolation.shared_user,
        executor.run_as(),
    ) {
        (true, _, run_as) => Check::ok(
            "account",
            format!(
                "each run gets a uid of its own from executor.uid_range {} (builds run as \
                 executor.run_as {})",
                cfg.executor.uid_range,
                run_as.unwrap_or("-")
            ),
        ),
        (false, true, _) => Check::warn(
            "account",
            format!(
                "not root (uid {}): agents run as this same user and can read its files",
                nix::unistd::Uid::effective()
            ),
            "run the harness as root (agents then run as executor.run_as or a uid of \
             executor.uid_range), or accept it with executor.allow_shared_user: true",
        ),
        (false, false, run_as) => Check::warn(
            "account",
            format!(
                "every agent runs as executor.run_as {}: runs share one account",
                run_as.unwrap_or("-")
            ),
            "set executor.uid_range to a block of uids no account uses, for a uid per run",
        ),
    };
    checks.push(account);
    let isolation = executor.isolation;
    checks.push(match isolation.missing() {
        None => Check::ok("isolation", isolation.describe()),
        Some(gaps) => Check::warn(
            "isolation",
            format!("{}; missing: {gaps}", isolation.describe()),
            "run as root on a host with cgroup v2 and namespaces (see README, The sandbox) \
             for every guarantee",
        ),
    });
    checks
}

async fn python_check(executor: &Executor) -> Check {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(&executor.python)
            .arg("--version")
            .kill_on_drop(true)
            .output(),
    )
    .await;
    match out {
        Ok(Ok(o)) if o.status.success() => {
            // Python 2 printed its version on stderr.
            let version = [o.stdout, o.stderr]
                .iter()
                .map(|b| String::from_utf8_lossy(b).trim().to_string())
                .find(|s| !s.is_empty())
                .unwrap_or_default();
            Check::ok(
                "python",
                format!("{} ({version})", executor.python.display()),
            )
        }
        Ok(Ok(o)) => Check::fail(
            "python",
            format!(
                "executor.python resolves to {}, which exits with {} on --version",
                executor.python.display(),
                o.status
            ),
            "set executor.python (HARNESS_EXECUTOR__PYTHON) to a working interpreter",
        ),
        Ok(Err(e)) => Check::fail(
            "python",
            format!("cannot run {}: {e}", executor.python.display()),
            "set executor.python (HARNESS_EXECUTOR__PYTHON) to a working interpreter",
        ),
        Err(_) => Check::fail(
            "python",
            format!(
                "{} --version did not answer within 10 s",
                executor.python.display()
            ),
            "set executor.python (HARNESS_EXECUTOR__PYTHON) to a working interpreter",
        ),
    }
}

/// Reachable (never setting a private database up) and migrated.
async fn database_checks(cfg: &Config) -> Vec<Check> {
    let home = std::path::absolute(&cfg.home).unwrap_or_else(|_| cfg.home.clone());
    if cfg.database.url.is_none() && !db::private::is_initialised(&cfg.home) {
        return vec![Check::warn(
            "database",
            format!(
                "no DATABASE_URL and no private database under {} yet",
                home.display()
            ),
            "`harness up` or `harness migrate` creates one there (other commands refuse to); \
             or set HARNESS_HOME to the home you meant, or DATABASE_URL",
        )];
    }
    let database = match Database::open_existing(cfg).await {
        Ok(d) => d,
        Err(e) => {
            return vec![Check::fail(
                "database",
                e.to_string(),
                "start PostgreSQL or correct DATABASE_URL (database.url); for the private \
                 one, `harness down` then `harness up`",
            )];
        }
    };
    let where_ = match database.private_server() {
        Some(s) => format!("private PostgreSQL under {}", s.home().display()),
        None => redact_url(database.url()),
    };
    let mut checks = vec![Check::ok("database", format!("reachable: {where_}"))];
    checks.push(match db::missing_migrations(&database.pool).await {
        Ok(missing) if missing.is_empty() => Check::ok(
            "migrations",
            format!(
                "all {} applied (schema version {})",
                db::MIGRATOR.iter().count(),
                db::MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
            ),
        ),
        Ok(missing) => Check::warn(
            "migrations",
            format!("missing {missing:?}"),
            "`harness migrate` applies them (replicas do at start, unless --no-migrate)",
        ),
        Err(e) => Check::fail(
            "migrations",
            format!("cannot read the applied migrations: {e}"),
            "grant the role SELECT on _sqlx_migrations, or run `harness migrate`",
        ),
    });
    database.close().await;
    checks
}

/// Whether a replica could listen on `api.bind`, and if not, who holds it.
fn bind_check(addr: SocketAddr) -> Check {
    let fix = "stop what listens there, or set api.bind (HARNESS_API__BIND) to a free address";
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Check::ok("api.bind", format!("{addr} can be bound")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => match port_holder(addr.port()) {
            Some((pid, comm)) if comm == "harness" => Check::warn(
                "api.bind",
                format!("{addr} is in use by harness (pid {pid}), a replica of this host"),
                "fine for that replica; another one on this host needs another api.bind",
            ),
            Some((pid, comm)) => Check::fail(
                "api.bind",
                format!("{addr} is in use by {comm} (pid {pid})"),
                fix,
            ),
            None => Check::fail("api.bind", format!("{addr} is in use"), fix),
        },
        Err(e) => Check::fail("api.bind", format!("cannot listen on {addr}: {e}"), fix),
    }
}

/// The process listening on TCP `port` (pid and name), from `/proc`; `None` where it cannot
/// tell (another user's process, as non-root).
fn port_holder(port: u16) -> Option<(i32, String)> {
    let inodes: Vec<u64> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|table| listening_inodes(&table, port))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| wanted.iter().any(|w| target.as_os_str() == w.as_str()))
        });
        if holds {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            return Some((pid, comm.trim().to_string()));
        }
    }
    None
}

/// Socket inodes in a `/proc/net/tcp` (or `tcp6`) table that listen on `port`.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit(':').next()?;
            let listening = *fields.get(3)? == LISTEN;
            (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| fields.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

fn tokens_check(cfg: &Config) -> Check {
    let tokens = &cfg.api.tokens;
    if tokens.is_empty() {
        return if cfg.api.bind.ip().is_loopback() {
            Check::warn(
                "api.tokens",
                format!(
                    "none: every process on this host (agents too) may call the API on {} \
                     with admin rights",
                    cfg.api.bind
                ),
                "set api.tokens (HARNESS_API__TOKENS) outside development",
            )
        } else {
            Check::fail(
                "api.tokens",
                format!(
                    "none, and api.bind {} is reachable beyond this host: `harness serve` \
                     would give every caller admin rights (`harness up` makes a one-off token)",
                    cfg.api.bind
                ),
                "set api.tokens (HARNESS_API__TOKENS), or bind the API to 127.0.0.1",
            )
        };
    }
    let admin = tokens
        .iter()
        .filter(|t| matches!(t.scope, Scope::Admin))
        .count();
    Check::ok(
        "api.tokens",
        format!(
            "{} configured ({admin} admin, {} read)",
            tokens.len(),
            tokens.len() - admin
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_inodes_are_the_listeners_of_the_port_only() {
        // 127.0.0.1:8080 listening (inode 111), a connection from port 8080 (inode 222),
        // 0.0.0.0:8081 listening (inode 333).
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 20 4 30 10 -1
   2: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(listening_inodes(table, 8080), vec![111]);
        assert_eq!(listening_inodes(table, 8081), vec![333]);
        assert!(listening_inodes(table, 9).is_empty());
    }

    #[test]
    fn a_line_says_the_status_the_check_and_the_fix() {
        let c = Check::fail(
            "python",
            "executor.python = \"/x\": gone",
            "install python3",
        );
        assert_eq!(
            c.line(),
            "FAIL  python     executor.python = \"/x\": gone; fix: install python3"
        );
        assert_eq!(
            Check::ok("database", "reachable").line(),
            "ok    database   reachable"
        );
    }
}
