//! A fork bomb in an agent is contained. In a file of its own: it uses up the agent
//! account's process budget (RLIMIT_NPROC counts per user), which would make the spawns of
//! agents running in parallel tests fail.

use std::time::Duration;

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

#[tokio::test]
async fn a_fork_bomb_is_contained() {
    let (e, mut spec) = python(
        "import os, time\nclass Agent:\n    def execute(self):\n        n = 0\n\
         \x20       try:\n            while True:\n                if os.fork() == 0:\n\
         \x20                   time.sleep(60); os._exit(0)\n                n += 1\n\
         \x20       except OSError as e:\n            return {'forked': n, 'error': str(e)}\n",
    );
    spec.timeout = Duration::from_secs(20);
    let r = e.run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    let forked = r.result.as_ref().unwrap()["forked"].as_u64().unwrap();
    assert!(forked < 200, "stopped after {forked} forks");
    assert!(
        r.result.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("Resource temporarily unavailable")
    );
}
