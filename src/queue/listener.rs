//! The dedicated `LISTEN` connection of one replica: wake-ups for new work and cancel
//! requests.

use sqlx::PgPool;

use super::{CANCEL_CHANNEL, Error, TASKS_CHANNEL, TaskId};

/// What woke a replica's listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wakeup {
    /// New or returned work may be claimable.
    Tasks,
    /// Someone asked to cancel this task.
    Cancel(TaskId),
    /// The listener reconnected: notifications may have been missed.
    Reconnected,
}

/// The dedicated `LISTEN` connection of one replica.
pub struct Listener {
    pub(super) inner: sqlx::postgres::PgListener,
}

impl Listener {
    /// Registers interest in both channels before the caller's first claim, so a task
    /// enqueued in between is not missed.
    pub async fn connect(pool: &PgPool) -> Result<Listener, Error> {
        let mut inner = sqlx::postgres::PgListener::connect_with(pool).await?;
        inner.listen_all([TASKS_CHANNEL, CANCEL_CHANNEL]).await?;
        Ok(Listener { inner })
    }

    /// The next wake-up. Reconnects by itself after a lost connection (and says so).
    pub async fn next(&mut self) -> Result<Wakeup, Error> {
        match self.inner.try_recv().await? {
            None => Ok(Wakeup::Reconnected),
            Some(n) if n.channel() == CANCEL_CHANNEL => match n.payload().parse() {
                Ok(id) => Ok(Wakeup::Cancel(id)),
                Err(_) => Ok(Wakeup::Tasks),
            },
            Some(_) => Ok(Wakeup::Tasks),
        }
    }
}
