//! The queues as the fleet serves them: each queue's backlog and pause (from `queue`) with
//! the live replicas serving it and their capacity for it (from `replicas`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::queue::queues::QueueInfo;

/// A queue and who serves it, as `harness queues` and `GET /api/queues` show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct QueueView {
    #[serde(flatten)]
    pub queue: QueueInfo,
    /// Live replicas serving it, with their capacity for it (empty: nothing runs its tasks).
    pub served_by: BTreeMap<String, i64>,
}

/// Every queue that holds tasks, has a pause on record, or is served by a replica whose
/// heartbeat is younger than `max_age`, by name.
pub async fn queues(
    pool: &sqlx::PgPool,
    max_age: Duration,
) -> Result<Vec<QueueView>, crate::queue::Error> {
    let replicas = super::replicas::list(pool, max_age).await?;
    let mut views: BTreeMap<String, QueueView> = crate::queue::queues::list(pool)
        .await?
        .into_iter()
        .map(|queue| {
            (
                queue.name.clone(),
                QueueView {
                    queue,
                    served_by: BTreeMap::new(),
                },
            )
        })
        .collect();
    for r in replicas {
        for (q, n) in r.queues {
            views
                .entry(q.clone())
                .or_insert_with(|| QueueView {
                    queue: QueueInfo::empty(&q),
                    served_by: BTreeMap::new(),
                })
                .served_by
                .insert(r.id.clone(), n);
        }
    }
    Ok(views.into_values().collect())
}
