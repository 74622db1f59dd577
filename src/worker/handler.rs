//! What a task kind's code sees and returns: [`Handler`] (a function of the payload or of the
//! whole [`TaskContext`]), [`HandlerError`], and the [`Registry`] of handlers by kind. A
//! handler may also hand off an agent's state, or end its attempt as timed out, skipped or
//! deferred, through its context.

use crate::handoff::HandoffWrite;
use crate::queue::TaskId;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a handler sees of the task it runs.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub id: TaskId,
    pub kind: String,
    pub payload: Value,
    /// 1 for the first attempt.
    pub attempt: i32,
    pub agent_id: Option<i64>,
    pub traceparent: Option<String>,
    /// Cancelled when the task is cancelled or the replica gives up on it; a long handler
    /// may watch it to stop early (it is also dropped at that point).
    pub cancel: CancellationToken,
    pub(super) control: Arc<Mutex<Control>>,
    pub(super) lease: super::Lease,
}

/// What a handler asks of the pool beyond its `Ok`/`Err`.
#[derive(Debug, Default)]
pub(super) struct Control {
    pub(super) handoff: Option<HandoffWrite>,
    pub(super) verdict: Option<Verdict>,
}

#[derive(Debug)]
pub(super) enum Verdict {
    TimedOut(String),
    Skip(String),
    Defer(Duration),
}

impl TaskContext {
    /// The attempt's right to start: ask [`super::Lease::check`] right before anything the
    /// task does outside the process (a sandboxed run's process is started only if it allows).
    pub fn lease(&self) -> super::Lease {
        self.lease.clone()
    }

    /// State for the agent's next run, written in the transaction that completes this task
    /// (only if it completes successfully and this attempt still owns it).
    pub fn hand_off(&self, write: HandoffWrite) {
        self.control.lock().expect("control lock").handoff = Some(write);
    }
    /// Ends the attempt as `timeout` (retried while retries remain), e.g. when a sandboxed
    /// process ran out of time.
    pub fn timed_out(&self, message: impl Into<String>) {
        self.control.lock().expect("control lock").verdict =
            Some(Verdict::TimedOut(message.into()));
    }
    /// Ends the task as `cancelled` with this reason, without running it (never retried).
    pub fn skip(&self, reason: impl Into<String>) {
        self.control.lock().expect("control lock").verdict = Some(Verdict::Skip(reason.into()));
    }
    /// Puts the task back to `pending` for `delay`, its attempt not counted.
    pub fn defer(&self, delay: Duration) {
        self.control.lock().expect("control lock").verdict = Some(Verdict::Defer(delay));
    }
}

/// A handler's failure: its message is stored as the task's error. Any error converts
/// (`?`) into a retryable one; [`HandlerError::permanent`] says no retry can succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// Retried while the task has retries left.
    Retryable(String),
    /// No retry can succeed (a payload the kind cannot take, a program that does not
    /// exist): the task ends `failed` at once, whatever retries it has left.
    Permanent(String),
}

impl HandlerError {
    /// A failure no retry can cure.
    pub fn permanent(message: impl Into<String>) -> HandlerError {
        HandlerError::Permanent(message.into())
    }

    pub fn message(&self) -> &str {
        match self {
            HandlerError::Retryable(m) | HandlerError::Permanent(m) => m,
        }
    }
}

impl<E: std::fmt::Display> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::Retryable(e.to_string())
    }
}

/// A JSON number that is a whole number (`5` or `5.0`: JSON Schema's integer), as an i64.
pub fn whole(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

/// A kind's check of a payload, run before a task is stored: the error says which field
/// is wrong and what is allowed.
pub type ValidateFn = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

pub(super) type HandlerFn =
    Arc<dyn Fn(TaskContext) -> BoxFuture<'static, Result<Value, HandlerError>> + Send + Sync>;

/// A registered task kind.
#[derive(Clone)]
pub struct Handler {
    pub(super) func: HandlerFn,
    /// The kind's default timeout (a task's own `timeout_ms` overrides it).
    pub timeout: Option<Duration>,
    /// Refuses a payload at enqueue that the handler could never run.
    pub(super) validate: Option<ValidateFn>,
}

impl Handler {
    /// A handler of the payload alone (for code that needs no [`TaskContext`]).
    pub fn from_payload<F, Fut, E>(f: F) -> Handler
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, E>> + Send + 'static,
        E: std::fmt::Display + 'static,
    {
        Handler {
            func: Arc::new(move |ctx: TaskContext| {
                let fut = f(ctx.payload);
                async move {
                    fut.await
                        .map_err(|e| HandlerError::Retryable(e.to_string()))
                }
                .boxed()
            }),
            timeout: None,
            validate: None,
        }
    }

    /// A handler that sees the whole [`TaskContext`].
    pub fn from_context<F, Fut>(f: F) -> Handler
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, HandlerError>> + Send + 'static,
    {
        Handler {
            func: Arc::new(move |ctx| f(ctx).boxed()),
            timeout: None,
            validate: None,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Handler {
        self.timeout = Some(timeout);
        self
    }

    /// Checks every payload before it is stored (the API and `Harness::enqueue` refuse a
    /// payload that fails); the handler itself should treat such a payload as a
    /// [`HandlerError::permanent`] failure.
    pub fn with_validation(
        mut self,
        validate: impl Fn(&Value) -> Result<(), String> + Send + Sync + 'static,
    ) -> Handler {
        self.validate = Some(Arc::new(validate));
        self
    }
}

/// Handlers by kind.
#[derive(Clone, Default)]
pub struct Registry {
    pub(super) handlers: HashMap<String, Handler>,
}

impl Registry {
    pub fn insert(&mut self, kind: impl Into<String>, handler: Handler) {
        self.handlers.insert(kind.into(), handler);
    }
    pub fn get(&self, kind: &str) -> Option<&Handler> {
        self.handlers.get(kind)
    }
    /// Whether `kind` is registered and takes `payload`: the error names the problem.
    pub fn validate(&self, kind: &str, payload: &Value) -> Result<(), String> {
        match self.handlers.get(kind) {
            None => Err(format!(
                "{kind:?} is not a kind this fleet runs; allowed: {}",
                self.kinds().join(", ")
            )),
            Some(Handler {
                validate: Some(v), ..
            }) => v(payload),
            Some(_) => Ok(()),
        }
    }

    pub fn kinds(&self) -> Vec<String> {
        let mut k: Vec<String> = self.handlers.keys().cloned().collect();
        k.sort();
        k
    }
}
