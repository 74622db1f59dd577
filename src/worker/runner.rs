//! The tower service at the bottom of the apalis stack: runs one attempt end to end (a claim
//! too old to start is handed back), maps every ending to one [`Outcome`], and passes the
//! completion, with its hold permit, to the completer (its run permit is freed at once).

use crate::queue::{Claimed, Completion, Outcome, TaskId, backoff};
use apalis::prelude::*;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::*;

/// The tower service at the bottom of the apalis stack: runs one attempt end to end.
#[derive(Clone)]
pub(super) struct Runner {
    pub(super) shared: Arc<Shared>,
}

impl tower::Service<Task<Job>> for Runner {
    type Response = ();
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<(), Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, task: Task<Job>) -> Self::Future {
        let shared = self.shared.clone();
        async move {
            run_attempt(shared, task.args).await;
            Ok(())
        }
        .boxed()
    }
}

/// The longest a task of a quarantined agent or kind waits before it is looked at again.
const QUARANTINE_RECHECK: Duration = Duration::from_secs(5);

pub(super) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".to_string())
}

pub(super) async fn run_attempt(shared: Arc<Shared>, job: Job) {
    let Job {
        claimed: c,
        hold,
        run,
        lane,
        lane_slot,
        claimed_at,
        arrived_at,
    } = job;
    let lease = shared.lease(claimed_at.into_std());
    if give_back_stale(&shared, &c, claimed_at, &lease).await {
        shared.ended.notify_waiters();
        return;
    }
    // How long the row waited in the prefetch buffer: part of its pick-up.
    let buffered = arrived_at.elapsed();
    let token = CancellationToken::new();
    shared
        .running
        .lock()
        .expect("running lock")
        .insert(c.id, (c.attempt, token.clone()));
    let control = Arc::new(Mutex::new(Control::default()));
    let span = tracing::info_span!(
        "task.execute",
        task.id = c.id,
        task.kind = %c.kind,
        task.attempt = c.attempt,
        replica = %shared.options.replica,
    );
    if let Some(parent) = c
        .traceparent
        .as_deref()
        .and_then(crate::telemetry::parent_from)
    {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let _ = span.set_parent(parent);
    }
    let began = std::time::Instant::now();
    let outcome = attempt(&shared, &c, &token, &control, lease)
        .instrument(span)
        .await;
    // The slot is free for the next buffered row while this completion waits to be written.
    drop(run);
    drop(lane_slot);
    shared.lanes.ended(lane, began.elapsed());
    count(&shared, &c, &outcome, began.elapsed(), buffered);
    let retry_at = chrono::Utc::now()
        + backoff::delay(
            shared.options.retry_base,
            (c.retry_count + 1) as u32,
            &mut rand::thread_rng(),
        );
    // Still ours? A shutdown past its grace period may have released it already, and the
    // entry may belong to a newer attempt of the same task (rescued, then claimed again here).
    let ours = |m: &HashMap<TaskId, (i32, CancellationToken)>| {
        m.get(&c.id)
            .is_some_and(|(attempt, _)| *attempt == c.attempt)
    };
    let still_ours = ours(&shared.running.lock().expect("running lock"));
    if !still_ours {
        // Released by a shutdown past its grace: nothing to write.
        shared.forget([(c.id, c.attempt)]);
    } else {
        let handoff = match outcome {
            Outcome::Success(_) => control.lock().expect("control lock").handoff.take(),
            _ => None,
        };
        let completion = Completion {
            id: c.id,
            attempt: c.attempt,
            outcome,
            retry_at,
            handoff,
        };
        // Sent before the entry goes, so a draining shutdown still counts this attempt while
        // its completion waits for room in the completer's channel. The hold permit is freed
        // by the completer once the completion is durable.
        let _ = shared
            .completions
            .send(Finished {
                completion,
                _permit: hold,
            })
            .await;
    }
    {
        let mut running = shared.running.lock().expect("running lock");
        if ours(&running) {
            running.remove(&c.id);
        }
    }
    shared.ended.notify_waiters();
}

/// A claim that came back late (the process was stopped, or the database stalled) may already
/// have been rescued and run elsewhere, and so may one that a break in the heartbeats outlived
/// (its lease); one made while claiming is suspended may be rescued at any moment. Such a claim
/// is given back (fenced by the attempt) rather than run twice. Returns whether it was.
async fn give_back_stale(
    shared: &Shared,
    c: &Claimed,
    claimed_at: tokio::time::Instant,
    lease: &Lease,
) -> bool {
    let age = claimed_at.elapsed();
    let suspended = !shared.claiming.load(std::sync::atomic::Ordering::SeqCst);
    let revoked = lease.check().err();
    if age <= shared.options.claim_max_age && !suspended && revoked.is_none() {
        return false;
    }
    tracing::warn!(
        task.id = c.id,
        task.attempt = c.attempt,
        claim_age_ms = age.as_millis() as u64,
        suspended,
        lease = revoked.as_deref().unwrap_or("held"),
        "not starting a claimed task: the claim is too old, its lease is lost or claiming is \
         suspended; returning it to the queue"
    );
    if let Err(e) = shared
        .queue
        .release(&shared.options.replica, &[(c.id, c.attempt)])
        .await
    {
        tracing::warn!(task.id = c.id, error = %e, "could not return the task now; the next reconciliation will");
    }
    shared.forget([(c.id, c.attempt)]);
    true
}

/// Runs the handler of the attempt under its timeout and cancel token; every ending becomes
/// one [`Outcome`].
async fn attempt(
    shared: &Shared,
    c: &Claimed,
    token: &CancellationToken,
    control: &Arc<Mutex<Control>>,
    lease: Lease,
) -> Outcome {
    let Some(handler) = shared.registry.get(&c.kind) else {
        return Outcome::Failed(format!(
            "no handler for kind {:?} on replica {}",
            c.kind, shared.options.replica
        ));
    };
    if let Some(until) = shared.quarantines.until(&c.kind, c.agent_id) {
        tracing::info!(%until, "not started: its agent or kind is quarantined");
        // Looked at again within QUARANTINE_RECHECK: a person may lift it before its end.
        let wait = (until - chrono::Utc::now())
            .to_std()
            .unwrap_or_default()
            .clamp(Duration::from_millis(100), QUARANTINE_RECHECK);
        return Outcome::Deferred(wait);
    }
    let timeout = c
        .timeout_ms
        .map(|ms| Duration::from_millis(ms as u64))
        .or(handler.timeout)
        .unwrap_or(shared.options.default_timeout);
    let ctx = TaskContext {
        id: c.id,
        kind: c.kind.clone(),
        payload: c.payload.clone(),
        attempt: c.attempt,
        agent_id: c.agent_id,
        traceparent: c.traceparent.clone(),
        cancel: token.clone(),
        control: control.clone(),
        lease,
    };
    // Inside the guard, so a handler that panics while building its future is caught too.
    let func = handler.func.clone();
    let run = AssertUnwindSafe(async move { func(ctx).await }).catch_unwind();
    let began = std::time::Instant::now();
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, run) => match r {
            Ok(Ok(Ok(v))) => match control.lock().expect("control lock").verdict.take() {
                None => Outcome::Success(v),
                Some(Verdict::TimedOut(e)) => Outcome::TimedOut(e),
                Some(Verdict::Skip(reason)) => Outcome::Skipped(reason),
                Some(Verdict::Defer(d)) => Outcome::Deferred(d),
            },
            Ok(Ok(Err(HandlerError::Retryable(e)))) => Outcome::Failed(e),
            Ok(Ok(Err(HandlerError::Permanent(e)))) => Outcome::FailedPermanently(e),
            Ok(Err(panic)) => Outcome::Failed(format!("handler panicked: {}", panic_message(&*panic))),
            Err(_) => Outcome::TimedOut(format!("timed out after {:.3}s", timeout.as_secs_f64())),
        },
        _ = token.cancelled() => Outcome::Cancelled,
    };
    // Only handlers that ran size the prefetch buffer: a quarantined or unknown kind, turned
    // away at once, would make every task look instant.
    shared.pace.ended(began.elapsed());
    match &outcome {
        Outcome::Success(_) => tracing::debug!("task completed"),
        Outcome::Cancelled => tracing::info!("task cancelled"),
        Outcome::Skipped(reason) => tracing::info!(%reason, "task skipped"),
        Outcome::Deferred(d) => tracing::debug!(delay_ms = d.as_millis() as u64, "task deferred"),
        Outcome::Failed(e) | Outcome::TimedOut(e) => {
            tracing::warn!(error = %e, "task attempt failed")
        }
        Outcome::FailedPermanently(e) => {
            tracing::warn!(error = %e, "task failed permanently (not retried)")
        }
    }
    outcome
}

/// What an outcome counts as, for the governor and the metrics rows.
#[derive(Debug, PartialEq, Eq)]
enum Counted {
    Completed,
    Failed,
    /// Cancelled or skipped: ended, neither a success nor a failure.
    Neither,
    /// Deferred (`overlap: queue`): not an end at all; it is claimed again later.
    NotEnded,
}

fn counted(outcome: &Outcome) -> Counted {
    match outcome {
        Outcome::Success(_) => Counted::Completed,
        Outcome::Failed(_) | Outcome::FailedPermanently(_) | Outcome::TimedOut(_) => {
            Counted::Failed
        }
        Outcome::Cancelled | Outcome::Skipped(_) => Counted::Neither,
        Outcome::Deferred(_) => Counted::NotEnded,
    }
}

/// One count for the governor (failures drive its pauses), and the metrics.
/// `ran`: from the attempt's start to its end; `buffered`: its wait in the prefetch buffer.
fn count(shared: &Shared, c: &Claimed, outcome: &Outcome, ran: Duration, buffered: Duration) {
    let m = crate::telemetry::metrics();
    let attrs = crate::telemetry::task_attrs(&c.kind, c.agent_id);
    let counter = match counted(outcome) {
        Counted::Failed => {
            shared
                .quarantines
                .failed(super::Target::of(&c.kind, c.agent_id));
            m.failed.add(1, &attrs);
            let retried = !matches!(outcome, Outcome::FailedPermanently(_));
            if retried && c.retry_count < c.max_retries {
                m.retried.add(1, &attrs);
            }
            Some(&shared.failed)
        }
        Counted::Completed => {
            m.completed.add(1, &attrs);
            Some(&shared.completed)
        }
        Counted::Neither => None,
        Counted::NotEnded => return,
    };
    if let Some(counter) = counter {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    m.duration.record(ran.as_secs_f64(), &attrs);
    // From due to start: until the claim, as the database saw it, then the buffer's wait.
    let claimed = (c.started_at - c.scheduled_at).to_std().unwrap_or_default();
    let waited = claimed + buffered;
    m.pickup_latency.record(waited.as_secs_f64(), &attrs);
    let us = waited.as_micros() as u64;
    shared
        .timed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared
        .pickup_us_total
        .fetch_add(us, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_successes_count_as_completed_and_a_deferred_run_counts_nothing() {
        use std::time::Duration;
        assert_eq!(
            counted(&Outcome::Success(serde_json::json!({}))),
            Counted::Completed
        );
        assert_eq!(counted(&Outcome::Failed("x".into())), Counted::Failed);
        assert_eq!(counted(&Outcome::TimedOut("x".into())), Counted::Failed);
        assert_eq!(counted(&Outcome::Cancelled), Counted::Neither);
        assert_eq!(counted(&Outcome::Skipped("busy".into())), Counted::Neither);
        assert_eq!(
            counted(&Outcome::Deferred(Duration::from_secs(1))),
            Counted::NotEnded
        );
    }

    #[test]
    pub(super) fn panic_messages_are_kept() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(panic_message(&*p), "boom 7");
        let p = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(panic_message(&*p), "static");
    }
}
