//! The connection pool, the migrations in `migrations/`, and the private PostgreSQL server
//! that stands in when no database URL is configured.
//!
//! Guarantees: [`migrate`] is idempotent and safe to run from several processes at once
//! (sqlx serialises it with an advisory lock); connection errors never show a password.
//! Holds no business rules: the tables belong to `queue`, `agents`, `scheduler`, `governor`.

pub mod private;
pub mod text;

use std::path::PathBuf;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::config::{Config, redact_url};
pub use private::{Left, PrivateServer, ServerOptions, Shutdown, Stopper, shut_down_home};

/// Every migration in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The database a private server creates for the harness itself.
pub const PRIVATE_DATABASE: &str = "harness";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "DATABASE_URL is not set and no PostgreSQL server binaries were found \
         (searched: {searched}); install PostgreSQL (e.g. `apt-get install postgresql`) \
         or set DATABASE_URL"
    )]
    NoBinaries { searched: String },
    #[error("{what}: {detail}")]
    Server { what: String, detail: String },
    #[error(
        "PostgreSQL must run as the unprivileged user `{user}` (it refuses root), but that user \
         cannot enter {path}; set HARNESS_HOME to a directory it can reach (e.g. under /tmp)"
    )]
    Unreachable { user: String, path: PathBuf },
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "there is no database under {}: no private PostgreSQL has been set up in this home. \
         Run `harness up` (or `harness migrate`) to create one here, set HARNESS_HOME to the \
         home you meant, or set DATABASE_URL to use a server of your own",
        home.display()
    )]
    NoPrivateDatabase { home: PathBuf },
    #[error("cannot connect to PostgreSQL at {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error(
        "cannot connect to PostgreSQL at {url} (database.session_url, the session-capable \
         way to the database): {source}"
    )]
    SessionConnect { url: String, source: sqlx::Error },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
}

/// Whether opening the database may set up a private one that does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfAbsent {
    /// initdb and create it (`up`, `serve`, `migrate`: commands that set a home up).
    Create,
    /// Fail with [`Error::NoPrivateDatabase`] (one-shot commands: a typo in `HARNESS_HOME`,
    /// or a command run in the wrong directory, must not make an empty 47 MB database and
    /// report 0 tasks from it).
    Refuse,
}

/// An open database: the pool, the way to sessions of its own, and the private server
/// behind it when there is one.
#[derive(Debug)]
pub struct Database {
    pub pool: PgPool,
    url: String,
    session: PgConnectOptions,
    /// The session URL without its password, for errors.
    session_label: String,
    server: Option<PrivateServer>,
}

impl Database {
    /// Connects to `database.url`, or starts (or joins) the private server under `home`,
    /// setting it up first when there is none.
    pub async fn open(cfg: &Config) -> Result<Database, Error> {
        Database::open_with(cfg, IfAbsent::Create).await
    }

    /// [`Database::open`], but a private database that does not exist yet is an error
    /// rather than made: the home is left as it was.
    pub async fn open_existing(cfg: &Config) -> Result<Database, Error> {
        Database::open_with(cfg, IfAbsent::Refuse).await
    }

    pub async fn open_with(cfg: &Config, if_absent: IfAbsent) -> Result<Database, Error> {
        let (url, server) = match &cfg.database.url {
            Some(url) => (url.expose().to_string(), None),
            None => {
                let absent = || Error::NoPrivateDatabase {
                    home: std::path::absolute(&cfg.home).unwrap_or_else(|_| cfg.home.clone()),
                };
                if if_absent == IfAbsent::Refuse && !private::is_initialised(&cfg.home) {
                    return Err(absent());
                }
                let options = ServerOptions {
                    bindir: cfg.database.pg_bindir.clone(),
                    ephemeral: false,
                    port: None,
                };
                let server = start_private(cfg.home.clone(), options).await?;
                match if_absent {
                    IfAbsent::Create => create_database(&server, PRIVATE_DATABASE).await?,
                    // The server was set up but its database never made (a start that was
                    // interrupted): still nothing to read. Dropping `server` leaves it.
                    IfAbsent::Refuse => {
                        if !database_exists(&server.url("postgres"), PRIVATE_DATABASE).await? {
                            return Err(absent());
                        }
                    }
                }
                (server.url(PRIVATE_DATABASE), Some(server))
            }
        };
        let pool = connect(&url, cfg.database.max_connections).await?;
        let (session, session_label) = match &cfg.database.session_url {
            Some(session_url) => {
                let label = redact_url(session_url.expose());
                let session = options(session_url.expose())?;
                // Reached now, or the first LISTEN or migration would fail far from here.
                let conn = session
                    .connect()
                    .await
                    .map_err(|source| Error::SessionConnect {
                        url: label.clone(),
                        source,
                    })?;
                let _ = conn.close().await;
                (session, label)
            }
            None => ((*pool.connect_options()).clone(), redact_url(&url)),
        };
        Ok(Database {
            pool,
            url,
            session,
            session_label,
            server,
        })
    }

    /// [`migrate`] on a session of its own: sqlx serialises migrations with a session
    /// advisory lock, which must be taken and released on the same server connection.
    pub async fn migrate(&self) -> Result<(), Error> {
        let mut conn = self
            .session
            .connect()
            .await
            .map_err(|source| Error::Connect {
                url: self.session_label.clone(),
                source,
            })?;
        let result = migrate_on(&mut conn).await;
        let _ = conn.close().await;
        result
    }

    /// The URL the pool connects to (contains the password when the configured one does).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn private_server(&self) -> Option<&PrivateServer> {
        self.server.as_ref()
    }

    /// Closes the pool, then leaves (and, if last, stops) the private server.
    pub async fn close(self) {
        self.pool.close().await;
        if let Some(server) = self.server {
            let _ = tokio::task::spawn_blocking(move || server.stop()).await;
        }
    }
}

/// Starts or joins the private server without blocking the runtime.
pub async fn start_private(home: PathBuf, options: ServerOptions) -> Result<PrivateServer, Error> {
    tokio::task::spawn_blocking(move || PrivateServer::start(&home, &options))
        .await
        .expect("private server start-up panicked")
}

/// Creates `name` on the private server unless it exists (safe when two processes race).
pub async fn create_database(server: &PrivateServer, name: &str) -> Result<(), Error> {
    create_database_at(&server.url("postgres"), name).await
}

const DATABASE_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)";

/// Whether database `name` exists on the server of `admin_url`.
pub async fn database_exists(admin_url: &str, name: &str) -> Result<bool, Error> {
    let admin = connect(admin_url, 1).await?;
    let exists = sqlx::query_scalar(DATABASE_EXISTS)
        .bind(name)
        .fetch_one(&admin)
        .await;
    admin.close().await;
    Ok(exists?)
}

/// Creates database `name` on the server of `admin_url` unless it exists.
pub async fn create_database_at(admin_url: &str, name: &str) -> Result<(), Error> {
    let admin = connect(admin_url, 1).await?;
    let exists: bool = sqlx::query_scalar(DATABASE_EXISTS)
        .bind(name)
        .fetch_one(&admin)
        .await?;
    if !exists {
        // CREATE DATABASE takes no bind parameters; the name is quoted as an identifier.
        let sql = format!("CREATE DATABASE {}", quote_ident(name));
        if let Err(e) = sqlx::query(&sql).execute(&admin).await {
            let duplicate = e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "42P04" || c == "23505");
            if !duplicate {
                return Err(e.into());
            }
        }
    }
    admin.close().await;
    Ok(())
}

/// Drops database `name` on the server of `admin_url`, disconnecting its sessions.
pub async fn drop_database_at(admin_url: &str, name: &str) -> Result<(), Error> {
    let admin = connect(admin_url, 1).await?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(name)
    ))
    .execute(&admin)
    .await?;
    admin.close().await;
    Ok(())
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, database: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            u.set_path(&format!("/{database}"));
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

/// `"name"` with embedded quotes doubled: an identifier that cannot break out of its quotes.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The options of `url` as the harness connects: without sqlx's `extra_float_digits`
/// start-up parameter (values travel in binary), which PgBouncer refuses unless told to
/// ignore it. Errors name the server but never the password.
pub fn options(url: &str) -> Result<PgConnectOptions, Error> {
    url.parse::<PgConnectOptions>()
        .map(|o| o.extra_float_digits(None))
        .map_err(|source| Error::Connect {
            url: redact_url(url),
            source,
        })
}

/// A pool on `url` whose errors name the server but never the password.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options(url)?)
        .await
        .map_err(|source| Error::Connect {
            url: redact_url(url),
            source,
        })
}

/// Where a replica's `LISTEN` connections come from: `pool` itself when `session` is `None`
/// (the pool's connections are sessions of their own), else a pool of its own on `session`
/// (two: the wake-up listener and the scheduler leader's), opened when first used.
pub fn session_pool(pool: &PgPool, session: Option<PgConnectOptions>) -> PgPool {
    match session {
        None => pool.clone(),
        Some(options) => PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(options),
    }
}

/// Whether `e` says the database could not be reached or could not serve the statement right
/// now (so the same statement may succeed later), rather than that it refused what was sent.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08 connection exception, 40 serialization failure / deadlock, 53 insufficient
            // resources, 57 operator intervention (shutdown, but 57014: a statement timeout,
            // which the same rows would hit again), 58 system error, 55P03 lock not available.
            let class = &code[..2.min(code.len())];
            matches!(class, "08" | "40" | "53" | "58")
                || (class == "57" && code != "57014")
                || code == "55P03"
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// One round trip to the database: what "reachable" means for readiness.
pub async fn ping(pool: &PgPool) -> Result<(), Error> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// Applies every migration of this binary not applied yet.
///
/// Migrations the database has and this binary does not know (a newer release's, after a
/// rollback, or an old pod restarting after the upgrade's migration Job) are left alone: the
/// compatibility rule is that a release's migrations only add (tables, nullable or defaulted
/// columns, indexes), and what a release stops using is removed one release later, so the
/// previous binary works on the newer schema.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    migrator().run(pool).await?;
    Ok(())
}

/// [`migrate`] on one connection.
pub async fn migrate_on(conn: &mut PgConnection) -> Result<(), Error> {
    migrator().run(conn).await?;
    Ok(())
}

fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// Versions of this binary's migrations the database lacks (empty: nothing to do).
pub async fn missing_migrations(pool: &PgPool) -> Result<Vec<i64>, Error> {
    let applied: Vec<i64> =
        match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
        {
            Ok(v) => v,
            Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P01") => {
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
    Ok(MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect())
}

/// True when every embedded migration has been applied (what readiness means). Newer
/// migrations this binary does not know do not matter (see [`migrate`]).
pub async fn migrations_current(pool: &PgPool) -> Result<bool, Error> {
    Ok(missing_migrations(pool).await?.is_empty())
}
