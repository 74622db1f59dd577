//! The HTTP/1.1 server under the API: accepts connections, bounds how many are open and how
//! long each may take to say what it wants, and shuts down gracefully.
//!
//! Guarantees:
//! - at most `api.max_connections` connections are open; at the limit, a new connection
//!   closes the one that has waited longest without sending a request (or, failing that,
//!   without finishing a request body) — a connection whose request is being handled is never
//!   closed — so stalled clients cannot lock out the health checks of an orchestrator;
//! - a connection sends a whole request head within `api.header_timeout_s`, also between
//!   requests on a kept-alive connection (hyper's header read timeout);
//! - the process's open-file limit is raised to its hard limit at start, so the connection
//!   limit, not the file descriptors, is what runs out;
//! - on shutdown no new connection is accepted and requests in flight finish.
//!
//! What happens inside a request (body timeout, size limit, concurrency) is the router's.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Where a connection is in its current request, as the eviction at the limit sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// No request yet, or idle between requests: waiting for a request head.
    Waiting = 0,
    /// A request head arrived; its body is being read.
    ReadingBody = 1,
    /// A whole request is being handled.
    Handling = 2,
}

/// A connection's phase, shared with the request (as an extension) so the body reader can
/// say when the body has arrived.
#[derive(Debug, Clone)]
pub struct ConnPhase(Arc<AtomicU8>);

impl ConnPhase {
    pub fn set(&self, p: Phase) {
        self.0.store(p as u8, Ordering::Relaxed);
    }
    fn get(&self) -> Phase {
        match self.0.load(Ordering::Relaxed) {
            0 => Phase::Waiting,
            1 => Phase::ReadingBody,
            _ => Phase::Handling,
        }
    }
}

/// The limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

impl ServerLimits {
    pub fn from_config(api: &crate::config::ApiConfig) -> ServerLimits {
        ServerLimits {
            max_connections: api.max_connections,
            header_timeout: Duration::from_secs(api.header_timeout_s),
        }
    }
}

struct Conn {
    phase: ConnPhase,
    close: CancellationToken,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Conns {
    next: u64,
    open: BTreeMap<u64, Conn>,
}

impl Conns {
    /// Makes room for one more: closes the oldest waiting connection, else the oldest still
    /// reading a body. False when every open connection is handling a request.
    fn evict_one(&mut self) -> bool {
        for wanted in [Phase::Waiting, Phase::ReadingBody] {
            if let Some((&id, _)) = self.open.iter().find(|(_, c)| c.phase.get() == wanted) {
                if let Some(c) = self.open.remove(&id) {
                    c.close.cancel();
                }
                return true;
            }
        }
        false
    }
}

/// Raises this process's soft open-file limit to its hard limit (a server's usual start).
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, soft, hard, "could not raise the open-files limit");
    }
}

/// Registers a new connection, evicting a stalled one when `max` are open; `None` when every
/// open connection is handling a request (the new one is refused).
fn admit(conns: &Mutex<Conns>, max: usize) -> Option<(u64, ConnPhase, CancellationToken)> {
    let mut c = conns.lock().expect("connections lock");
    if c.open.len() >= max && !c.evict_one() {
        tracing::warn!(
            max_connections = max,
            "every connection is handling a request; refusing a new one"
        );
        return None;
    }
    let id = c.next;
    c.next += 1;
    let phase = ConnPhase(Arc::new(AtomicU8::new(Phase::Waiting as u8)));
    let close = CancellationToken::new();
    c.open.insert(
        id,
        Conn {
            phase: phase.clone(),
            close: close.clone(),
        },
    );
    Some((id, phase, close))
}

/// The router as a hyper service that marks the connection's phase: reading a body while a
/// request is in, waiting (evictable) between requests.
fn service(
    router: Router,
    phase: ConnPhase,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let router = router.clone();
        let phase = phase.clone();
        phase.set(Phase::ReadingBody);
        req.extensions_mut().insert(phase.clone());
        async move {
            let response = router
                .oneshot(req.map(Body::new))
                .await
                .unwrap_or_else(|e: Infallible| match e {});
            phase.set(Phase::Waiting);
            Ok::<_, Infallible>(response)
        }
    })
}

/// Serves `router` on `listener` until `shutdown`, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    raise_open_files_limit();
    let conns = Arc::new(Mutex::new(Conns::default()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors or the like: back off instead of spinning; the
                    // connections that hold them time out or finish meanwhile.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some((id, phase, close)) = admit(&conns, limits.max_connections) else {
            continue; // dropping the stream closes it
        };
        let _ = stream.set_nodelay(true);
        let service = service(router.clone(), phase);
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        let conns = conns.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = connection => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = close.cancelled() => {
                    tracing::debug!("closed a stalled connection to make room");
                }
            }
            conns.lock().expect("connections lock").open.remove(&id);
        });
    }
    drop(listener);
    // Requests in flight finish; idle connections close at once.
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(c: &mut Conns, p: Phase) -> CancellationToken {
        let close = CancellationToken::new();
        let id = c.next;
        c.next += 1;
        c.open.insert(
            id,
            Conn {
                phase: ConnPhase(Arc::new(AtomicU8::new(p as u8))),
                close: close.clone(),
            },
        );
        close
    }

    #[test]
    fn eviction_takes_the_oldest_waiting_then_the_oldest_reading_never_a_handled_one() {
        let mut c = Conns::default();
        let busy = conn(&mut c, Phase::Handling);
        let reading = conn(&mut c, Phase::ReadingBody);
        let waiting_old = conn(&mut c, Phase::Waiting);
        let waiting_new = conn(&mut c, Phase::Waiting);
        assert!(c.evict_one());
        assert!(waiting_old.is_cancelled() && !waiting_new.is_cancelled());
        assert!(c.evict_one());
        assert!(waiting_new.is_cancelled());
        assert!(c.evict_one());
        assert!(reading.is_cancelled());
        assert!(!c.evict_one(), "a request being handled is never cut off");
        assert!(!busy.is_cancelled());
    }
}
