//! The one thread agent processes are forked from.
//!
//! A child's parent-death signal (`PR_SET_PDEATHSIG`) is sent when the *thread* that forked
//! it exits, not only when the process does. Runtime threads come and go (the blocking pool
//! retires idle threads), so every agent process is forked from this thread, which lives as
//! long as the process: the signal then means exactly "the harness died".

use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

type Request = (
    Command,
    tokio::runtime::Handle,
    oneshot::Sender<std::io::Result<Child>>,
);

static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();

/// Spawns `cmd` from the spawner thread, registered with the caller's runtime (which reaps
/// the child and drives its pipes).
pub async fn spawn(cmd: Command) -> std::io::Result<Child> {
    let requests = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("harness-spawner".into())
            .spawn(move || {
                for (mut cmd, runtime, reply) in rx {
                    let _entered = runtime.enter();
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the spawner thread");
        tx
    });
    let (reply, answer) = oneshot::channel();
    requests
        .send((cmd, tokio::runtime::Handle::current(), reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .await
        .map_err(|_| std::io::Error::other("the spawner thread dropped the request"))?
}
