//! The sandbox per run against hostile agents, on whatever the host offers: a uid per run,
//! a cgroup per run (pure v2 or hybrid), private temporary directories, `network: none`.
//! A test whose mode this host cannot give says "skipped: <why>" on stderr and passes; the
//! rlimit fallback has its own tests in `agents.rs` and `fork_bomb.rs`.

mod common;

use std::time::{Duration, Instant};

use harness::executor::{ExecStatus, Executor, Network, RunSpec, Runtime};
use serde_json::{Value, json};

fn executor_with(settings: &[(&str, &str)]) -> Executor {
    let env = settings.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    let cfg = harness::Config::load_from(None, env).unwrap();
    Executor::new(&cfg.executor).unwrap()
}

fn executor() -> Executor {
    executor_with(&[])
}

fn python(e: &Executor, code: &str, config: Value) -> RunSpec {
    let mut spec = RunSpec::new(
        Runtime::Python {
            code: code.to_string(),
        },
        e,
    );
    spec.config = config;
    spec.timeout = Duration::from_secs(30);
    spec
}

/// Says loudly that a test does not apply here; true when it does not.
fn skipped(available: bool, why: &str) -> bool {
    if !available {
        eprintln!("skipped: {why}");
    }
    !available
}

/// A marker no other process on the host carries.
fn marker() -> String {
    format!("3600.{}", rand::random::<u32>() % 1_000_000_000)
}

/// The daemons (`sleep <marker>`) started with `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    let wanted = format!("sleep\0{marker}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted.as_bytes())
                && !zombie(*pid)
        })
        .collect()
}

fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

/// An agent that starts a daemon (`setsid`, double fork, `sleep <marker>`), then lingers.
const DAEMON: &str = r#"import os, time
class Agent:
    def __init__(self, config):
        self.c = config
    def execute(self):
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv('/bin/sleep', ['sleep', self.c['marker']])
            os._exit(0)
        os.wait()
        time.sleep(self.c['linger'])
        return {}
"#;

async fn daemon_seen(marker: &str) {
    common::eventually("the daemon to start", Duration::from_secs(20), async || {
        (!processes_with(marker).is_empty()).then_some(())
    })
    .await;
}

async fn daemon_gone_within_a_second(marker: &str, after: &str) {
    let t0 = Instant::now();
    while !processes_with(marker).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "a setsid daemon outlived its run by over a second ({after}): {:?}",
            processes_with(marker)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_setsid_daemon_dies_with_its_run_its_timeout_and_its_cancel() {
    let e = std::sync::Arc::new(executor());
    if skipped(
        e.isolation.cgroup_kill || e.isolation.uid_per_run,
        "neither cgroup.kill nor a uid per run (not root?): a setsid escapee cannot be found",
    ) {
        return;
    }
    // The run ends normally.
    let m = marker();
    let spec = python(&e, DAEMON, json!({"marker": m, "linger": 2}));
    let run = tokio::spawn({
        let e = e.clone();
        async move { e.run(&spec).await.unwrap() }
    });
    daemon_seen(&m).await;
    let r = run.await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    daemon_gone_within_a_second(&m, "success").await;

    // Its timeout.
    let m = marker();
    let mut spec = python(&e, DAEMON, json!({"marker": m, "linger": 300}));
    spec.timeout = Duration::from_secs(2);
    let r = e.run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Timeout, "{r:?}");
    daemon_gone_within_a_second(&m, "timeout").await;

    // A cancel: the run's future is dropped.
    let m = marker();
    let spec = python(&e, DAEMON, json!({"marker": m, "linger": 300}));
    let run = tokio::spawn({
        let e = e.clone();
        async move { e.run(&spec).await }
    });
    daemon_seen(&m).await;
    run.abort();
    let _ = run.await;
    daemon_gone_within_a_second(&m, "cancel").await;

    // Without cgroups, a uid per run finds the daemon by its uid.
    let e = executor_with(&[("HARNESS_EXECUTOR__CGROUPS", "false")]);
    if skipped(e.isolation.uid_per_run, "no uid per run: no kill by uid") {
        return;
    }
    let m = marker();
    let r = e
        .run(&python(&e, DAEMON, json!({"marker": m, "linger": 0.5})))
        .await
        .unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    daemon_gone_within_a_second(&m, "success, killed by uid").await;
}

#[tokio::test]
async fn a_daemon_of_a_killed_harness_is_reaped_when_the_next_one_starts() {
    if skipped(
        executor().isolation.cgroup_kill,
        "no cgroup.kill: what a kill -9'd harness leaves is reaped by process group only",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("daemon.py");
    std::fs::write(&agent, DAEMON).unwrap();
    let m = marker();
    let mut exec = common::harness_command();
    exec.args(["exec", agent.to_str().unwrap(), "--config"])
        .arg(json!({"marker": m, "linger": 300}).to_string());
    let mut harness = common::Proc::spawn(&mut exec);
    daemon_seen(&m).await;
    // The harness's fork server, and the run it forked.
    let server = children_of(harness.pid());
    assert_eq!(server.len(), 1, "one child, the fork server: {server:?}");
    let run = children_of(server[0]);
    assert_eq!(run.len(), 1, "one run: {run:?}");
    harness.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = harness.wait_for_exit(Duration::from_secs(10));
    // Both die with it (their parent-death signals).
    common::eventually(
        "the server and its run to die",
        Duration::from_secs(2),
        async || {
            [server[0], run[0]]
                .iter()
                .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists() || zombie(*p))
                .then_some(())
        },
    )
    .await;
    // The daemon left the process group: only its cgroup still holds it. The next harness
    // on the host (this one, or one that another test starts meanwhile) reaps it.
    let _next = executor();
    daemon_gone_within_a_second(&m, "the next harness started").await;
}

#[tokio::test]
async fn a_replica_sigterm_ends_its_runs_and_their_daemons() {
    if skipped(
        executor().isolation.cgroup_kill,
        "no cgroup.kill on this host",
    ) {
        return;
    }
    let db = common::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("daemon.py");
    let m = marker();
    // `agents run` gives input, not config: the marker is in the code.
    let code = DAEMON
        .replace("self.c['marker']", &format!("'{m}'"))
        .replace("self.c['linger']", "300");
    std::fs::write(&agent, code).unwrap();
    let url = db.url.clone();
    let out = common::harness_at(&url)
        .args(["agents", "add", "daemon", "--file", agent.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = common::harness_at(&url)
        .args(["agents", "run", "daemon"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut serve = common::harness_at(&url);
    serve
        .args(["serve", "--no-api"])
        .env("HARNESS_BULK__SHUTDOWN_GRACE_S", "1");
    let mut replica = common::Proc::spawn(&mut serve);
    daemon_seen(&m).await;
    // The fleet shows the replica's isolation: its mode and the guarantees that hold.
    let out = common::harness_at(&url)
        .args(["fleet", "--json"])
        .output()
        .unwrap();
    let fleet: Value = serde_json::from_slice(&out.stdout).unwrap();
    let shown = fleet[0]["isolation"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(shown, executor().isolation.describe(), "{fleet}");
    assert!(shown.contains("cgroup-kill"), "{shown}");
    replica.signal(nix::sys::signal::Signal::SIGTERM);
    let status = replica
        .wait_for_exit(Duration::from_secs(30))
        .expect("the replica exits after its shutdown grace");
    assert!(status.success(), "{status:?}");
    daemon_gone_within_a_second(&m, "replica SIGTERM").await;
}

/// Finds the live run whose code holds `marker`: the process whose working directory's
/// `agent.py` holds it (as root, the test can read it). Its initial environment
/// (`/proc/<pid>/environ`) would not do: a run forked from the fork server has the server's.
fn process_of_run(marker: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cwd/agent.py"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat`, from the state (3) on.
fn stat_field(pid: i32, n: usize) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(n - 3)?
        .parse()
        .ok()
}

/// The live processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| stat_field(*p, 4) == Some(pid) && !zombie(*p))
        .collect()
}

/// An agent that sleeps a minute, with `marker` in its code.
fn sleeper(marker: &str) -> String {
    format!(
        "import time\n# {marker}\nclass Agent:\n    def execute(self):\n        time.sleep(60)\n"
    )
}

/// Starts `spec` (whose code holds `marker`) and returns its task and its process, once it
/// runs.
async fn start_run(
    e: &std::sync::Arc<Executor>,
    spec: RunSpec,
    marker: &str,
) -> (
    tokio::task::JoinHandle<Result<harness::executor::ExecutionResult, harness::executor::Error>>,
    i32,
) {
    let run = tokio::spawn({
        let e = e.clone();
        async move { e.run(&spec).await }
    });
    let pid = common::eventually("the run to start", Duration::from_secs(20), async || {
        process_of_run(marker)
    })
    .await;
    (run, pid)
}

const SPY: &str = r#"import os
class Agent:
    def __init__(self, config):
        self.c = config
    def execute(self):
        def attempt(f):
            try:
                f()
                return 'read'
            except PermissionError:
                return 'denied'
            except Exception as e:
                return 'error: %r' % e
        pid, cwd = self.c['pid'], self.c['cwd']
        return {
            'uid': os.getuid(),
            'groups': os.getgroups(),
            'environ': attempt(lambda: open('/proc/%d/environ' % pid).read()),
            'proc_cwd': attempt(lambda: os.listdir('/proc/%d/cwd' % pid)),
            'cwd': attempt(lambda: os.listdir(cwd)),
            'input': attempt(lambda: open(os.path.join(cwd, 'input.json')).read()),
            'code': attempt(lambda: open(os.path.join(cwd, 'agent.py')).read()),
        }
"#;

#[tokio::test]
async fn concurrent_runs_have_their_own_uids_and_cannot_read_each_other() {
    let e = std::sync::Arc::new(executor());
    if skipped(e.isolation.uid_per_run, "no uid per run (not root)") {
        return;
    }
    // Agent A: a secret in its environment, its input and its code; it waits.
    let secret = format!("API_KEY_{}", rand::random::<u64>());
    let mut a = python(&e, &sleeper(&secret), json!({"secret": secret}));
    a.env.insert("API_KEY".into(), secret.clone());
    let (run_a, pid) = start_run(&e, a, &secret).await;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    // Agent B spies on A.
    let b = python(&e, SPY, json!({"pid": pid, "cwd": cwd}));
    let r = e.run(&b).await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    let v = r.result.unwrap();
    for what in ["environ", "proc_cwd", "cwd", "input", "code"] {
        assert_eq!(v[what], "denied", "B could reach A's {what}: {v}");
    }
    assert_ne!(
        v["uid"].as_u64().unwrap() as u32,
        uid_of(pid),
        "one uid for two runs"
    );
    assert_eq!(v["groups"], json!([]), "a run has no supplementary groups");
    run_a.abort();
    let _ = run_a.await;
    common::eventually(
        "agent A to die with its cancel",
        Duration::from_secs(2),
        async || process_of_run(&secret).is_none().then_some(()),
    )
    .await;
}

/// Sum of the resident anonymous memory of the processes whose environment holds `marker`.
fn anon_rss_kb(marker: &str) -> u64 {
    let mut total = 0;
    for pid in std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if !String::from_utf8_lossy(&env).contains(marker) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

#[tokio::test]
async fn three_children_of_180_mb_under_256_mb_fail_the_run_with_the_memory_message() {
    let e = executor();
    if skipped(e.isolation.cgroup_memory, "no memory cgroup on this host") {
        return;
    }
    let code = r#"import os, time
class Agent:
    def execute(self):
        kids = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                x = b'x' * (180 * 1024 * 1024)
                time.sleep(3)
                os._exit(0)
            kids.append(pid)
        for k in kids:
            os.waitpid(k, 0)
        return {'survived': True}
"#;
    let tag = format!("MEMTEST_{}", rand::random::<u64>());
    let mut spec = python(&e, code, json!({}));
    spec.memory_mb = 256;
    spec.env.insert("MEMTEST".into(), tag.clone());
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let (peak, done, tag) = (peak.clone(), done.clone(), tag.clone());
        move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(anon_rss_kb(&tag), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    let r = e.run(&spec).await.unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(r.status, ExecStatus::Error, "{r:?}");
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .starts_with("memory limit exceeded (256 MB)"),
        "{r:?}"
    );
    let peak_mb = peak.load(std::sync::atomic::Ordering::Relaxed) / 1024;
    eprintln!("peak resident memory of the run: {peak_mb} MB");
    // Three children would hold 540 MB under per-process limits.
    assert!(
        peak_mb <= 256 + 16,
        "the run held {peak_mb} MB under a 256 MB limit"
    );
}

const FORK_BOMB: &str = r#"import os, time
class Agent:
    def execute(self):
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(30); os._exit(0)
                n += 1
        except OSError as e:
            return {'forks': n, 'error': str(e)}
"#;

#[tokio::test]
async fn a_fork_bomb_stops_at_its_runs_ceiling_while_a_neighbour_forks_normally() {
    let e = executor();
    if skipped(
        e.isolation.cgroup_pids || e.isolation.uid_per_run,
        "neither a pids cgroup nor a uid per run: the process ceiling is per account",
    ) {
        return;
    }
    let bomb = python(&e, FORK_BOMB, json!({}));
    let neighbour = python(
        &e,
        "import subprocess, time\nclass Agent:\n    def execute(self):\n\
         \x20       time.sleep(1)\n\
         \x20       return {'ran': [subprocess.run(['true']).returncode for _ in range(20)]}\n",
        json!({}),
    );
    let (b, n) = tokio::join!(e.run(&bomb), e.run(&neighbour));
    let (b, n) = (b.unwrap(), n.unwrap());
    assert_eq!(b.status, ExecStatus::Success, "{b:?}");
    let v = b.result.unwrap();
    let forks = v["forks"].as_u64().unwrap();
    assert!(
        forks > 1 && forks < e.max_processes,
        "{forks} forks under a ceiling of {}",
        e.max_processes
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("Resource temporarily unavailable"),
        "{v}"
    );
    assert_eq!(
        n.status,
        ExecStatus::Success,
        "the neighbour could not fork: {n:?}"
    );
    assert_eq!(n.result.unwrap()["ran"], json!(vec![0; 20]));
}

#[tokio::test]
async fn cpu_percent_is_a_rate_a_busy_loop_gets_a_fifth_of_a_core() {
    let e = executor();
    if skipped(
        e.isolation.cgroup_cpu,
        "no cpu cgroup: cpu_percent is a CPU-seconds budget",
    ) {
        return;
    }
    let mut spec = python(
        &e,
        "import time\nclass Agent:\n    def execute(self):\n\
         \x20       t0, c0 = time.monotonic(), time.process_time()\n\
         \x20       while time.monotonic() - t0 < 5:\n            pass\n\
         \x20       return {'share': (time.process_time() - c0) / (time.monotonic() - t0)}\n",
        json!({}),
    );
    spec.cpu_percent = 20;
    let r = e.run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    let share = r.result.unwrap()["share"].as_f64().unwrap();
    eprintln!(
        "a busy loop under cpu_percent 20 used {:.1} % of a core",
        share * 100.0
    );
    assert!(share <= 0.25, "{share}");
    assert!(share > 0.05, "it barely ran: {share}");
}

const LITTER: &str = r#"import os
class Agent:
    def __init__(self, config):
        self.c = config
    def execute(self):
        out = {'tmp_inode': os.stat('/tmp').st_ino, 'written': [], 'refused': {}}
        for d in ['/tmp', '/var/tmp', '/dev/shm']:
            p = os.path.join(d, self.c['name'])
            open(p, 'w').write('x' * 1000)
            out['written'].append(p)
        for p in ['/etc/harness-litter', '/harness-litter', '/run/harness/litter',
                  '/var/lib/harness-litter', '/usr/local/bin/harness-litter']:
            try:
                open(p, 'w').write('x')
                out['refused'][p] = 'written'
            except OSError as e:
                out['refused'][p] = e.strerror
        open(os.path.join(os.environ['HOME'], 'mine'), 'w').write('ok')
        return out
"#;

async fn litter(e: &Executor) -> Value {
    let name = format!("litter-{}", rand::random::<u64>());
    let r = e
        .run(&python(e, LITTER, json!({"name": name})))
        .await
        .unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    let v = r.result.unwrap();
    for p in v["written"].as_array().unwrap() {
        let p = std::path::Path::new(p.as_str().unwrap());
        assert!(!p.exists(), "{} was left behind", p.display());
    }
    for (path, outcome) in v["refused"].as_object().unwrap() {
        assert_ne!(outcome, "written", "a run wrote {path}");
    }
    v
}

#[tokio::test]
async fn temporary_files_go_with_the_run_and_writes_elsewhere_fail() {
    use std::os::unix::fs::MetadataExt;
    let host_tmp = std::fs::metadata("/tmp").unwrap().ino();
    let e = executor();
    if skipped(
        e.isolation.private_tmp,
        "no private /tmp (not root or no CAP_SYS_ADMIN)",
    ) {
        return;
    }
    let v = litter(&e).await;
    assert_ne!(v["tmp_inode"], host_tmp, "the run saw the host's /tmp");
    // Without a mount namespace, what the run's uid left in the host's directories goes.
    let shared = executor_with(&[("HARNESS_EXECUTOR__PRIVATE_TMP", "false")]);
    if skipped(
        shared.isolation.uid_per_run,
        "no uid per run: nothing to sweep by",
    ) {
        return;
    }
    let v = litter(&shared).await;
    assert_eq!(
        v["tmp_inode"], host_tmp,
        "this run should have shared the host's /tmp"
    );
}

const CONNECT: &str = r#"import socket
class Agent:
    def __init__(self, config):
        self.c = config
    def execute(self):
        try:
            socket.create_connection(('127.0.0.1', self.c['port']), timeout=3).close()
            return {'connected': True}
        except OSError as e:
            return {'connected': False, 'error': str(e)}
"#;

#[tokio::test]
async fn network_none_cannot_reach_a_listener_on_loopback() {
    let e = executor();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || for _ in listener.incoming() {});
    let allowed = e
        .run(&python(&e, CONNECT, json!({"port": port})))
        .await
        .unwrap();
    assert_eq!(
        allowed.result.unwrap()["connected"],
        true,
        "the control run connects"
    );
    let mut spec = python(&e, CONNECT, json!({"port": port}));
    spec.network = Network::None;
    if !e.isolation.network_none {
        let err = e.run(&spec).await.unwrap_err().to_string();
        assert!(err.contains("network: none needs"), "{err}");
        skipped(
            false,
            "no network namespace (not root): the run is refused, as checked",
        );
        return;
    }
    let r = e.run(&spec).await.unwrap();
    let v = r.result.clone().unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(v["connected"], false, "{v}");
}

#[test]
fn the_isolation_mode_names_what_holds() {
    let e = executor();
    let text = e.isolation.describe();
    eprintln!("isolation on this host: {text}");
    let expected_mode = e.isolation.mode;
    assert!(text.starts_with(expected_mode), "{text}");
    if nix::unistd::Uid::effective().is_root() {
        assert!(text.contains("uid-per-run"), "{text}");
    }
    if e.isolation.cgroup_kill {
        // Moves into run cgroups do not wait for RCU grace periods.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(
            mounts
                .lines()
                .any(|l| l.contains(" cgroup2 ") && l.contains("favordynmods")),
            "{mounts}"
        );
    }
    let rlimit_only = executor_with(&[
        ("HARNESS_EXECUTOR__CGROUPS", "false"),
        ("HARNESS_EXECUTOR__PRIVATE_TMP", "false"),
        ("HARNESS_EXECUTOR__UID_RANGE", ""),
    ]);
    assert_eq!(rlimit_only.isolation.mode, "rlimit");
    if nix::unistd::Uid::effective().is_root() {
        // A run uid must be nobody's: 65534 is `nobody`.
        let cfg = harness::Config::load_from(
            None,
            [(
                "HARNESS_EXECUTOR__UID_RANGE".to_string(),
                "65000-65999".to_string(),
            )],
        )
        .unwrap();
        let err = Executor::new(&cfg.executor).unwrap_err().to_string();
        assert!(err.contains("is an account on this host"), "{err}");
    }
    assert!(!rlimit_only.isolation.describe().contains("cgroup"));
    assert!(rlimit_only.isolation.missing().is_some());
}

/// The chart's container: root with only SETUID, SETGID, KILL, CHOWN, DAC_OVERRIDE and
/// FOWNER, no CAP_SYS_ADMIN (no namespaces) and no writable cgroups (a pod's /sys/fs/cgroup is
/// read-only; `executor.cgroups: false` stands for it here). Runs still get a uid of their
/// own, what they leave in /tmp goes, and a run directory made hard to delete (a sticky
/// directory of the run's own) goes too.
#[test]
fn the_charts_capabilities_give_a_uid_per_run_and_clean_up_after_it() {
    if skipped(
        nix::unistd::Uid::effective().is_root(),
        "needs root to drop to the chart's capabilities",
    ) {
        return;
    }
    let caps = "+setuid,+setgid,+kill,+chown,+dac_override,+fowner";
    let dir = tempfile::tempdir().unwrap();
    let name = format!("pod-litter-{}", rand::random::<u64>());
    let agent = dir.path().join("pod.py");
    std::fs::write(
        &agent,
        format!(
            "import os\nclass Agent:\n    def execute(self):\n\
             \x20       open('/tmp/{name}', 'w').write('x')\n\
             \x20       os.mkdir('sticky'); open('sticky/f', 'w').write('x')\n\
             \x20       os.chmod('sticky', 0o1000)\n\
             \x20       return {{'uid': os.getuid(), 'cwd': os.getcwd()}}\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new("setpriv")
        .arg(format!("--inh-caps=-all,{caps}"))
        .arg(format!("--bounding-set=-all,{caps}"))
        .arg("--")
        .arg(common::harness_bin())
        .arg("exec")
        .arg(&agent)
        .env("RUST_LOG", "warn")
        .env("HARNESS_HOME", common::scratch_home())
        .env("HARNESS_EXECUTOR__CGROUPS", "false")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let uid = r["result"]["uid"].as_u64().unwrap();
    assert!((200000..=200999).contains(&uid), "ran as {uid}");
    assert!(stderr.contains("rlimit: uid-per-run"), "{stderr}");
    assert!(
        !std::path::Path::new("/tmp").join(&name).exists(),
        "the run's file in the host's /tmp was left behind"
    );
    let cwd = r["result"]["cwd"].as_str().unwrap();
    assert!(
        !std::path::Path::new(cwd).exists(),
        "the run directory {cwd} was left behind"
    );
}

/// What a run can see of its own isolation, from inside.
const PROBE: &str = r#"import os, sys, random, resource
PRELOADED = 'asyncio' in sys.modules
class Agent:
    def execute(self):
        run = os.path.basename(os.getcwd())
        status = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)
        mounts = {}
        for line in open('/proc/self/mountinfo'):
            f = line.split()
            mounts[f[4]] = f[f.index('-') + 1]
        names = ['RLIMIT_NOFILE', 'RLIMIT_CORE', 'RLIMIT_FSIZE', 'RLIMIT_NPROC', 'RLIMIT_AS', 'RLIMIT_CPU']
        plain = ('PATH', 'LANG', 'TZ', 'PYTHONUNBUFFERED', 'HARNESS_PERMANENT_EXIT_CODE', 'API_KEY')
        return {
            'preloaded': PRELOADED,
            'ppid': os.getppid(),
            'uid': os.getuid(),
            'gid': os.getgid(),
            'groups': os.getgroups(),
            'group_leader': os.getpgrp() == os.getpid(),
            'env': {k: v if k in plain else '...' for k, v in os.environ.items()},
            'home_is_cwd': os.environ['HOME'] == os.getcwd(),
            'files_in_run_dir': all(os.environ[k].startswith(os.getcwd() + '/') for k in
                                    ['HARNESS_RESULT_FILE', 'HARNESS_INPUT_FILE', 'HARNESS_PROGRESS_FILE']),
            'limits': {n: list(resource.getrlimit(getattr(resource, n))) for n in names},
            'no_new_privs': status['NoNewPrivs'].strip(),
            'cgroups_of_the_run': sum(l.rstrip().endswith('/' + run) for l in open('/proc/self/cgroup')),
            'tmp': {p: mounts.get(p) for p in ['/tmp', '/var/tmp', '/dev/shm', '/run/lock']},
            'proc_environ': sorted(e.split(b'=')[0].decode() for e in open('/proc/self/environ', 'rb').read().split(b'\0') if e),
            'hash': hash('harness'),
            'fds': sorted(os.listdir('/proc/self/fd')),
            'stdin': os.read(0, 10).decode(),
            'argv': sys.argv,
            'sys_path': sys.path,
            'sys_flags': repr(sys.flags),
            'umask': os.umask(0o022),
            'random': random.random(),
        }
"#;

#[tokio::test]
async fn a_forked_run_is_isolated_exactly_as_an_execd_one() {
    let forked = executor();
    let execd = executor_with(&[("HARNESS_EXECUTOR__FORK_SERVER", "false")]);
    if skipped(forked.isolation.uid_per_run, "no uid per run (not root)") {
        return;
    }
    let report = async |e: &Executor| {
        let mut spec = python(e, PROBE, json!({}));
        spec.env.insert("API_KEY".into(), "k-123".into());
        let r = e.run(&spec).await.unwrap();
        assert_eq!(r.status, ExecStatus::Success, "{r:?}");
        r.result.unwrap()
    };
    let mut f = report(&forked).await;
    let mut x = report(&execd).await;
    // Every child reseeds `random` (Python does at fork); the string-hash seed is the
    // server's, shared by its runs.
    let again = report(&forked).await;
    assert_ne!(f["random"], again["random"]);
    assert_eq!(f["hash"], again["hash"]);
    assert_ne!(f["hash"], x["hash"]);
    // /proc/<pid>/environ: the run's own when exec'd, the server's scrubbed one when forked.
    assert_eq!(
        f["proc_environ"],
        json!(["HOME", "LANG", "PATH", "PYTHONUNBUFFERED", "TZ"]),
        "{f}"
    );
    assert!(
        x["proc_environ"]
            .as_array()
            .unwrap()
            .contains(&json!("API_KEY")),
        "{x}"
    );
    // Forked from the warm server, which had loaded asyncio; exec'd by the harness itself.
    assert_eq!(f["preloaded"], true, "{f}");
    assert_eq!(x["preloaded"], false, "{x}");
    assert_eq!(f["ppid"], forked.fork_server_pid().unwrap(), "{f}");
    assert_eq!(x["ppid"], std::process::id(), "{x}");
    assert_eq!(execd.fork_server_pid(), None);
    // Each its own uid from the range, no groups.
    for r in [&f, &x] {
        let uid = r["uid"].as_u64().unwrap();
        assert!((200_000..=200_999).contains(&uid), "{r}");
        assert_eq!(r["gid"], uid);
    }
    for r in [&mut f, &mut x] {
        for k in [
            "preloaded",
            "ppid",
            "uid",
            "gid",
            "random",
            "hash",
            "proc_environ",
        ] {
            r.as_object_mut().unwrap().remove(k);
        }
    }
    // Everything else the same: environment, limits, cgroups, mounts, descriptors (none
    // leaked from the server), stdin, flags.
    assert_eq!(f, x, "forked and exec'd runs differ");
    assert_eq!(f["env"]["API_KEY"], "k-123");
    assert_eq!(f["fds"], json!(["0", "1", "2", "3"]), "{f}");
    assert_eq!(f["no_new_privs"], "1");
    assert_eq!(f["group_leader"], true);
    if forked.isolation.private_tmp {
        assert_eq!(f["tmp"]["/tmp"], "tmpfs");
    }
    if forked.isolation.cgroup_memory {
        assert!(f["cgroups_of_the_run"].as_u64().unwrap() >= 1, "{f}");
    }
}

/// Scans its own memory for `HARNESS-LEAK-` and 16 hex digits, and returns the SHA-256 of
/// every such string found (not the strings, which would then be in this agent's memory as
/// a match of their own).
const SCAN: &str = r#"import hashlib, re
class Agent:
    def execute(self):
        found = set()
        pattern = re.compile(rb'HARNESS-LEAK-[0-9a-f]{16}')
        with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb') as mem:
            for line in maps:
                f = line.split()
                if 'r' not in f[1] or (len(f) > 5 and f[5] in ('[vvar]', '[vsyscall]')):
                    continue
                start, end = (int(x, 16) for x in f[0].split('-'))
                try:
                    mem.seek(start)
                    chunk = mem.read(end - start)
                except OSError:
                    continue
                for m in pattern.finditer(chunk):
                    found.add(hashlib.sha256(m.group()).hexdigest())
        return {'found': sorted(found)}
"#;

#[tokio::test]
async fn a_forked_run_cannot_find_in_its_memory_the_secrets_of_runs_forked_before_it() {
    let e = executor();
    let secret = format!("HARNESS-LEAK-{:016x}", rand::random::<u64>());
    let digest = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(secret.as_bytes()))
    };
    let scan = async |env: Option<&str>| {
        let mut spec = python(&e, SCAN, json!({}));
        if let Some(v) = env {
            spec.env.insert("TOKEN".into(), v.into());
        }
        let r = e.run(&spec).await.unwrap();
        assert_eq!(r.status, ExecStatus::Success, "{r:?}");
        r.result.unwrap()["found"].clone()
    };
    // The scan finds a secret where there is one: in its own environment.
    assert!(
        scan(Some(&secret))
            .await
            .as_array()
            .unwrap()
            .contains(&json!(digest)),
        "the scan does not find the run's own secret"
    );
    // Runs with the secret in their environment, input and config, forked from the server.
    for _ in 0..3 {
        let mut spec = python(
            &e,
            "class Agent:\n    def execute(self):\n        return {}\n",
            json!({ "key": secret }),
        );
        spec.env.insert("TOKEN".into(), secret.clone());
        // In strings of several sizes too, so that one later allocation cannot overwrite
        // every copy a careless server would have left in its freed memory.
        for pad in [50, 300, 700, 3_000, 20_000] {
            spec.env.insert(
                format!("TOKEN_{pad}"),
                format!("{secret}-{}", "p".repeat(pad)),
            );
        }
        spec.input = json!({ "key": secret });
        assert_eq!(e.run(&spec).await.unwrap().status, ExecStatus::Success);
    }
    assert!(e.fork_server_pid().is_some());
    let found = scan(None).await;
    assert!(
        !found.as_array().unwrap().contains(&json!(digest)),
        "a later run found an earlier run's secret in its memory"
    );
}

#[tokio::test]
async fn a_killed_fork_server_ends_its_runs_and_the_next_run_gets_a_new_one() {
    let e = std::sync::Arc::new(executor());
    let m = marker();
    let (run, pid) = start_run(&e, python(&e, &sleeper(&m), json!({})), &m).await;
    let server = e.fork_server_pid().expect("a fork server");
    assert_eq!(
        stat_field(pid, 4),
        Some(server),
        "the run is the server's child"
    );
    // The server leads a process group of its own: a Ctrl-C to ours does not reach it.
    assert_eq!(stat_field(server, 5), Some(server));
    assert_ne!(Some(server), stat_field(std::process::id() as i32, 5));
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the run ends when its server dies")
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(r.status, ExecStatus::Error, "{r:?}");
    assert!(
        r.error
            .as_deref()
            .unwrap_or_default()
            .contains("fork server"),
        "{r:?}"
    );
    common::eventually(
        "the run's process to die",
        Duration::from_secs(2),
        async || process_of_run(&m).is_none().then_some(()),
    )
    .await;
    let r = e.run(&python(&e, PROBE, json!({}))).await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    let new = e.fork_server_pid().expect("a new fork server");
    assert_ne!(new, server);
    assert_eq!(r.result.unwrap()["ppid"], new);
}

#[tokio::test]
async fn runs_that_set_what_an_interpreter_reads_as_it_starts_get_their_own() {
    let e = executor();
    for (key, value) in [
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("TZ", "Europe/Paris"),
        ("LANG", "C"),
        ("LC_ALL", "C"),
        ("HOME", "/tmp"),
    ] {
        let mut spec = python(&e, PROBE, json!({}));
        spec.env.insert(key.into(), value.into());
        let r = e.run(&spec).await.unwrap();
        assert_eq!(r.status, ExecStatus::Success, "{key}: {r:?}");
        let v = r.result.unwrap();
        assert_eq!(v["preloaded"], false, "{key}: {v}");
        assert_eq!(v["ppid"], std::process::id(), "{key}: {v}");
        if key == "PYTHONDONTWRITEBYTECODE" {
            // The variable took effect: the interpreter read it as it started.
            let flags = v["sys_flags"].as_str().unwrap();
            assert!(flags.contains("dont_write_bytecode=1"), "{v}");
        }
    }
    // An environment too big for the server's socket (270 KB): exec'd, and the server stays.
    let server = e.fork_server_pid();
    let mut spec = python(&e, PROBE, json!({}));
    for i in 0..3 {
        spec.env.insert(format!("BIG{i}"), "x".repeat(90_000));
    }
    let r = e.run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    assert_eq!(r.result.unwrap()["ppid"], std::process::id());
    let r = e.run(&python(&e, PROBE, json!({}))).await.unwrap();
    let v = r.result.unwrap();
    assert_eq!(v["preloaded"], true, "{v}");
    if let Some(server) = server {
        assert_eq!(v["ppid"], server, "the server was replaced");
    }
}

#[tokio::test]
async fn a_forked_run_ends_as_an_interpreter_does() {
    let forked = executor();
    let execd = executor_with(&[("HARNESS_EXECUTOR__FORK_SERVER", "false")]);
    // A thread still working when execute returns, an atexit handler, output without a
    // newline: the run's end waits for the first, runs the second, flushes the third.
    let code = r#"import atexit, os, sys, threading, time
class Kept:
    def __del__(self):
        os.write(1, b'finalized\n')
kept = Kept()
def late():
    time.sleep(0.3)
    print('thread done')
class Agent:
    def execute(self):
        threading.Thread(target=late).start()
        atexit.register(lambda: print('atexit ran'))
        sys.stderr.write('no newline')
        return {}
"#;
    // An object still alive at the end (`kept`, held by the agent's globals) is finalized by
    // an exec'd interpreter's teardown, not by a forked run's end.
    for (e, finalized) in [(&forked, ""), (&execd, "finalized\n")] {
        let r = e.run(&python(e, code, json!({}))).await.unwrap();
        assert_eq!(r.status, ExecStatus::Success, "{r:?}");
        assert_eq!(
            r.stdout,
            format!("thread done\natexit ran\n{finalized}"),
            "{r:?}"
        );
        assert_eq!(r.stderr, "no newline", "{r:?}");
    }
    assert!(forked.fork_server_pid().is_some());
}

#[tokio::test]
async fn a_stopped_fork_server_is_replaced_after_ten_seconds() {
    let e = executor();
    let run = async || {
        let r = e.run(&python(&e, PROBE, json!({}))).await.unwrap();
        assert_eq!(r.status, ExecStatus::Success, "{r:?}");
        r.result.unwrap()
    };
    run().await;
    let stopped = e.fork_server_pid().unwrap();
    let pid = nix::unistd::Pid::from_raw(stopped);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // This run waits for the stuck server, then starts its own interpreter.
    let t = Instant::now();
    let v = run().await;
    assert!(t.elapsed() >= Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(v["ppid"], std::process::id(), "{v}");
    // The next one gets a new server; the stopped one, forgotten, was killed.
    let v = run().await;
    let new = e.fork_server_pid().unwrap();
    assert_ne!(new, stopped);
    assert_eq!(v["ppid"], new, "{v}");
    common::eventually(
        "the stopped server to die",
        Duration::from_secs(5),
        async || {
            (!std::path::Path::new(&format!("/proc/{stopped}")).exists() || zombie(stopped))
                .then_some(())
        },
    )
    .await;
}
