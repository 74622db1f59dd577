//! Where governance events go: the `governance_events` table (through `fleet`) and the
//! operator's `agent.jsonl`; and the JSON-lines files themselves.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::fleet::{self, EventKind, GovernorState};

/// Appends JSON lines to a file under the logs directory; a failure is logged once.
pub(super) struct JsonLines {
    path: PathBuf,
    warned: bool,
}

impl JsonLines {
    pub(super) fn new(dir: &Path, name: &str) -> JsonLines {
        JsonLines {
            path: dir.join(name),
            warned: false,
        }
    }
    /// Appends one line. The directory is made 0700 and the file 0600: these logs are the
    /// operator's (failure messages, escalations), not the agents'.
    pub(super) fn append(&mut self, v: &Value) {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let result = (|| -> std::io::Result<()> {
            if let Some(d) = self.path.parent()
                && !d.is_dir()
            {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)?;
            if !self.warned {
                // A file an older version left readable by everyone.
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            writeln!(f, "{v}")
        })();
        if let Err(e) = result
            && !self.warned
        {
            self.warned = true;
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the JSON log");
        }
    }
}

/// Records governance events of one replica.
pub(super) struct Reporter {
    pool: PgPool,
    replica: String,
    log: JsonLines,
}

impl Reporter {
    pub(super) fn new(pool: PgPool, replica: &str, logs_dir: &Path) -> Reporter {
        Reporter {
            pool,
            replica: replica.to_string(),
            log: JsonLines::new(logs_dir, "agent.jsonl"),
        }
    }

    pub(super) async fn record(
        &mut self,
        kind: EventKind,
        from: Option<GovernorState>,
        to: Option<GovernorState>,
        reason: &str,
        detail: Value,
    ) {
        self.log.append(&json!({
            "at": Utc::now(), "replica": self.replica, "event": kind, "from": from, "to": to,
            "reason": reason, "detail": detail,
        }));
        if let Err(e) =
            fleet::health::record_event(&self.pool, &self.replica, kind, from, to, reason, &detail)
                .await
        {
            tracing::warn!(error = %e, "could not record a governance event");
        }
    }
}
