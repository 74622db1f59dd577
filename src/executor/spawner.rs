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
    Option<super::StartGate>,
    oneshot::Sender<Result<std::io::Result<Child>, String>>,
);

static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();

/// Spawns `cmd` from the spawner thread, registered with the caller's runtime (which reaps
/// the child and drives its pipes).
pub async fn spawn(cmd: Command) -> std::io::Result<Child> {
    match spawn_if(cmd, None).await {
        Ok(spawned) => spawned,
        Err(why) => Err(std::io::Error::other(why)),
    }
}

/// [`spawn`] once `gate` allows it, asked on the spawner thread just before the fork (so that
/// nothing of this process runs between the last check and the child): `Err` with the
/// gate's reason when it refuses, and nothing is spawned.
pub async fn spawn_if(
    cmd: Command,
    gate: Option<super::StartGate>,
) -> Result<std::io::Result<Child>, String> {
    let requests = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("harness-spawner".into())
            .spawn(move || {
                for (mut cmd, runtime, gate, reply) in rx {
                    let _entered = runtime.enter();
                    let spawned = match gate.as_ref().map_or(Ok(()), super::StartGate::check) {
                        Ok(()) => Ok(cmd.spawn()),
                        Err(why) => Err(why),
                    };
                    let _ = reply.send(spawned);
                }
            })
            .expect("start the spawner thread");
        tx
    });
    let (reply, answer) = oneshot::channel();
    if requests
        .send((cmd, tokio::runtime::Handle::current(), gate, reply))
        .is_err()
    {
        return Ok(Err(std::io::Error::other("the spawner thread is gone")));
    }
    answer.await.unwrap_or_else(|_| {
        Ok(Err(std::io::Error::other(
            "the spawner thread dropped the request",
        )))
    })
}
