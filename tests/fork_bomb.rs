//! A fork bomb in an agent is contained. In a file of its own: it uses up the agent
//! account's process budget (RLIMIT_NPROC counts per user), which would make the spawns of
//! agents running in parallel tests fail.

use std::time::{Duration, Instant};

use harness::executor::{ExecStatus, Executor, RunSpec, Runtime};

fn python(code: &str) -> (Executor, RunSpec) {
    let cfg = harness::Config::load_from(None, Vec::<(String, String)>::new()).unwrap();
    let e = Executor::new(&cfg.executor).unwrap();
    let spec = RunSpec::new(
        Runtime::Python {
            code: code.to_string(),
        },
        &e,
    );
    (e, spec)
}

/// Whether `pid` is gone (or a zombie waiting to be reaped: it runs nothing).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn a_fork_bomb_is_contained_and_its_children_die_with_the_run() {
    let (e, mut spec) = python(
        "import os, time\nclass Agent:\n    def execute(self):\n        pids = []\n\
         \x20       try:\n            while True:\n                pid = os.fork()\n\
         \x20               if pid == 0:\n                    time.sleep(60); os._exit(0)\n\
         \x20               pids.append(pid)\n\
         \x20       except OSError as e:\n            return {'pids': pids, 'error': str(e)}\n",
    );
    spec.timeout = Duration::from_secs(20);
    let r = e.run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    let result = r.result.unwrap();
    let pids: Vec<i32> = serde_json::from_value(result["pids"].clone()).unwrap();
    // It did fork, and the process limit stopped it.
    assert!(
        (1..200).contains(&pids.len()),
        "stopped after {} forks",
        pids.len()
    );
    assert!(
        result["error"]
            .as_str()
            .unwrap()
            .contains("Resource temporarily unavailable"),
        "{result}"
    );
    // The children (asleep for a minute) went with the run's process group.
    let t0 = Instant::now();
    while let Some(alive) = pids.iter().find(|p| !dead(**p)) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "child {alive} outlived its run"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
