//! The fleet's shared record: the `replicas` table (who is alive, who leads the scheduler, what
//! each governor says, who was asked to resume), and each replica's health history in the
//! `metrics` and `governance_events` tables. This module owns their SQL; the replica, the
//! scheduler, the governor, the API and the CLI call it.
//!
//! - [`replicas`]: registration and heartbeat ([`Heartbeat`]), leadership, governor state,
//!   resume requests, and the listing `harness fleet` shows;
//! - [`health`]: metrics rows, governance events, and their pruning;
//! - [`quarantines`]: agents and kinds no replica starts for a while (the `quarantines`
//!   table);
//! - [`serving`]: the queues with the live replicas serving them.

pub mod health;
pub mod quarantines;
pub mod replicas;
pub mod serving;

pub use health::{EventKind, MetricsRow};
pub use replicas::{Heartbeat, ReplicaRow, new_replica_id};

/// What a replica's governor says of it (the governor's state machine works in these terms).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum GovernorState {
    Normal,
    Throttled,
    Paused,
    Holding,
}

impl GovernorState {
    pub const ALL: [GovernorState; 4] = [
        GovernorState::Normal,
        GovernorState::Throttled,
        GovernorState::Paused,
        GovernorState::Holding,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GovernorState::Normal => "normal",
            GovernorState::Throttled => "throttled",
            GovernorState::Paused => "paused",
            GovernorState::Holding => "holding",
        }
    }

    pub fn parse(s: &str) -> Option<GovernorState> {
        GovernorState::ALL.into_iter().find(|g| g.as_str() == s)
    }

    /// The numeric form of metrics (0 normal, 1 throttled, 2 paused, 3 holding).
    pub fn code(self) -> i64 {
        self as i64
    }
}

impl sqlx::Type<sqlx::Postgres> for GovernorState {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <String as sqlx::Type<sqlx::Postgres>>::type_info()
    }
    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <String as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for GovernorState {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let s = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
        GovernorState::parse(s).ok_or_else(|| format!("unknown governor state {s:?}").into())
    }
}
