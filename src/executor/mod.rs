//! Running agent code in an isolated, resource-limited subprocess.
//!
//! Every run gets:
//! - a fresh working directory, removed afterwards;
//! - a scrubbed environment: only `PATH`, `LANG`, `TZ`, `HOME` (the working directory), the
//!   harness's own `HARNESS_*` run variables and the agent's `env`; never the harness's
//!   database URL, tokens or webhook;
//! - its own process group and, as root, its own uid from `executor.uid_range` (`uids`; else
//!   `executor.run_as`);
//! - where the host offers them, its own cgroup (`cgroup`: memory over all its processes, a
//!   process ceiling, a CPU rate, a kill that reaches escapees), private temporary directories
//!   and, for `network: none`, an empty network namespace (`sandbox`);
//! - rlimits: open files, file size, no core dumps, processes, and where no cgroup bounds
//!   them, address space (`memory_mb`) and CPU seconds (`timeout × cpu_percent`);
//! - a timeout: SIGTERM to the whole group, `kill_grace_s`, then SIGKILL; at every end of a
//!   run (and when its future is dropped) everything it started is killed;
//! - stdout and stderr kept up to `output_limit_kb` each, the rest drained.
//!
//! A Python run is forked from the executor's fork server (`forkserver`), a warm interpreter
//! whose child takes the same steps before the agent's code loads; other runs, and Python
//! runs the server cannot serve, are exec'd.
//!
//! The result never travels on stdout: the Python runner writes it to `HARNESS_RESULT_FILE`;
//! a command may write it there too, or print it as its last stdout line.
//!
//! This module never touches the database.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, Uid, User};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::config::ExecutorConfig;

mod cgroup;
mod forkserver;
pub mod output;
pub mod pyenv;
mod sandbox;
pub mod session;
mod spawner;
pub mod uids;

pub use sandbox::Isolation;

/// The runner as a program of its own (`forkserver.py` appends its loop to the same
/// definitions instead).
const RUNNER: &str = concat!(include_str!("runner.py"), "_main()\n");
/// The largest result accepted from an agent.
pub const MAX_RESULT_BYTES: u64 = 16 * 1024 * 1024;
/// The PATH agents see.
const AGENT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Inputs larger than this are passed by file only (an environment string is limited).
const MAX_ENV_INPUT: usize = 64 * 1024;
const MIB: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot prepare the run directory: {0}")]
    RunDir(std::io::Error),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("executor.run_as names {0:?}, which is not a user on this host")]
    NoSuchUser(String),
    #[error(
        "no Python interpreter found for agents: {0}; install python3 or set executor.python \
         to an interpreter the agent user can run"
    )]
    NoPython(String),
    #[error("the program {0:?} was not found (searched {AGENT_PATH})")]
    NoProgram(String),
    #[error(
        "permission denied: {user} cannot execute {path}; make it (and the directories above \
         it) executable for that account, e.g. chmod o+rx"
    )]
    NotExecutable { path: String, user: String },
    #[error("cannot set up the run's cgroup: {0}")]
    Cgroup(std::io::Error),
    #[error(
        "network: none needs a network namespace, which this replica cannot make (it needs \
         root with CAP_SYS_ADMIN); run the agent with network: allow or on a replica that can"
    )]
    NoNetworkNamespace,
    #[error("executor.uid_range: {0}")]
    UidRange(String),
    /// The run's [`StartGate`] refused just before its process would have started.
    #[error("not started: {0}")]
    NotStarted(String),
}

/// Asked just before a run's process starts (after everything else about the run is ready):
/// `Err` with a reason stops the run there, with nothing of it started ([`Error::NotStarted`]).
/// The worker passes one that refuses once another replica may have taken the task over.
#[derive(Clone)]
pub struct StartGate(std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl StartGate {
    pub fn new(check: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> StartGate {
        StartGate(std::sync::Arc::new(check))
    }

    pub fn check(&self) -> Result<(), String> {
        (self.0)()
    }
}

impl std::fmt::Debug for StartGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartGate")
    }
}

impl Error {
    /// Whether no retry of the run can succeed (the program is missing or the agent's
    /// account may not execute it), so the task should fail at once.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::NoProgram(_) | Error::NotExecutable { .. } => true,
            Error::Spawn { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ),
            _ => false,
        }
    }
}

/// The exit code with which a command says its failure is permanent (no retry can succeed);
/// also in its environment as `HARNESS_PERMANENT_EXIT_CODE`. 78 is `EX_CONFIG` of sysexits.h.
pub const PERMANENT_EXIT_CODE: i32 = 78;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecStatus {
    Success,
    Error,
    Timeout,
}

/// The outcome of one run: status, result, output and timing (public library API: its
/// shape is what callers of [`execute_agent_code`] read).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionResult {
    pub status: ExecStatus,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: Option<i32>,
    /// Seconds.
    pub duration: f64,
    /// The run said no retry can succeed (`harness.PermanentError`, or a command's exit
    /// code [`PERMANENT_EXIT_CODE`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permanent: bool,
}

/// What to run.
#[derive(Debug, Clone)]
pub enum Runtime {
    /// Python source defining `class Agent`.
    Python { code: String },
    /// A program and its arguments.
    Command { argv: Vec<String> },
}

/// One run: the code, its input and its limits.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub runtime: Runtime,
    pub config: Value,
    /// The task's input (the payload's `input`).
    pub input: Value,
    /// The previous handoff artifact, or null.
    pub handoff: Value,
    pub timeout: Duration,
    pub memory_mb: u64,
    pub cpu_percent: u32,
    pub env: BTreeMap<String, String>,
    pub network: Network,
    /// The interpreter of the agent's environment (see `pyenv`); none: `executor.python`.
    pub python: Option<PathBuf>,
    pub traceparent: Option<String>,
    /// Where the output and progress go while the run goes on (whoever stores them takes
    /// from it); none: only the result's head and tail.
    pub output: Option<std::sync::Arc<output::RunOutput>>,
    /// Asked just before the process starts; none: it always starts.
    pub gate: Option<StartGate>,
}

impl RunSpec {
    pub fn new(runtime: Runtime, settings: &Executor) -> RunSpec {
        RunSpec {
            runtime,
            config: json!({}),
            input: Value::Null,
            handoff: Value::Null,
            timeout: settings.default_timeout,
            memory_mb: settings.default_memory_mb,
            cpu_percent: settings.default_cpu_percent,
            env: BTreeMap::new(),
            network: Network::Allow,
            python: None,
            traceparent: None,
            output: None,
            gate: None,
        }
    }
}

/// Whether a run may use the network.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The host's network (agents call LLM APIs).
    #[default]
    Allow,
    /// A network namespace of its own with nothing in it: no connection leaves the run.
    None,
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Network, String> {
        match s {
            "allow" => Ok(Network::Allow),
            "none" => Ok(Network::None),
            other => Err(format!(
                "{other:?} is not a network setting; use allow or none"
            )),
        }
    }
}

/// The executor of one process: resolved interpreter, accounts, cgroups and limits.
#[derive(Debug, Clone)]
pub struct Executor {
    pub python: PathBuf,
    run_as: Option<User>,
    pub kill_grace: Duration,
    pub output_limit: usize,
    pub max_processes: u64,
    pub max_file_bytes: u64,
    pub tmp_mb: u64,
    pub default_timeout: Duration,
    pub default_memory_mb: u64,
    pub default_cpu_percent: u32,
    pub isolation: Isolation,
    /// This process's session, cgroups and uid leases.
    host: std::sync::Arc<Host>,
    /// Python environments of agents with requirements.
    envs: std::sync::Arc<pyenv::Environments>,
    /// Python runs of `python` are forked from it (`executor.fork_server`).
    fork_server: Option<std::sync::Arc<forkserver::ForkServer>>,
}

/// What one process holds on its host for its runs: its session directory, its cgroups and
/// the uid pool. The session's cgroup directories go when this does.
#[derive(Debug)]
struct Host {
    session: session::Session,
    cgroups: cgroup::Cgroups,
    /// A uid per run (root with `executor.uid_range`).
    uids: Option<uids::UidPool>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.cgroups.close_session(self.session.name());
    }
}

impl Executor {
    /// Resolves the interpreter and the accounts from the configuration, and finds what
    /// isolation the host offers (cgroups, namespaces, a uid per run).
    pub fn new(cfg: &ExecutorConfig) -> Result<Executor, Error> {
        let root = Uid::effective().is_root();
        if !root {
            // Agents will run as our own user: without this they could read our environment
            // (DATABASE_URL, tokens) and memory through /proc. Agents are dumpable again
            // after their exec; only this process is hidden.
            nix::sys::prctl::set_dumpable(false).map_err(|e| Error::RunDir(e.into()))?;
        }
        let run_as = if root {
            Some(
                User::from_name(&cfg.run_as)
                    .ok()
                    .flatten()
                    .ok_or_else(|| Error::NoSuchUser(cfg.run_as.clone()))?,
            )
        } else {
            None
        };
        let range = cfg.uid_range()?;
        if let Some(r) = range
            && root
        {
            // A run uid must be nobody's: kill_uid kills every process of it, and runs would
            // share an account's files.
            let taken = (r.first..=r.last).find(|uid| {
                User::from_uid(Uid::from_raw(*uid)).ok().flatten().is_some()
                    || run_as.as_ref().is_some_and(|u| u.uid.as_raw() == *uid)
            });
            if let Some(uid) = taken {
                return Err(Error::UidRange(format!(
                    "{r} contains uid {uid}, which is an account on this host; give runs a \
                     block no account uses"
                )));
            }
        }
        let runs = runs_dir()?;
        let uids = match range {
            Some(range) if root => {
                Some(uids::UidPool::open(&runs.join("uids"), range).map_err(Error::RunDir)?)
            }
            _ => None,
        };
        // The interpreter must be usable by the account runs get: a run uid has no group, so
        // "others" must be able to reach and execute it.
        let probe_ids = match (&uids, &run_as) {
            (Some(pool), _) => Some((pool.range().first, pool.range().first)),
            (None, Some(u)) => Some((u.uid.as_raw(), u.gid.as_raw())),
            (None, None) => None,
        };
        let who = match (&uids, &run_as) {
            (Some(pool), _) => format!("the run uids {}", pool.range()),
            (None, Some(u)) => format!("user {}", u.name),
            (None, None) => "the harness's own user".to_string(),
        };
        let python = resolve_python(&cfg.python, probe_ids, &who)?;
        let agent_uid = run_as
            .as_ref()
            .map_or(Uid::effective().as_raw(), |u| u.uid.as_raw());
        let cgroups = if root && cfg.cgroups {
            cgroup::Cgroups::detect()
        } else {
            cgroup::Cgroups::default()
        };
        if cfg.cgroup_favordynmods {
            cgroups.favor_dynamic_moves();
        }
        // Cgroups of dead processes first (their sessions' locks are free), then their run
        // directories; then a place of our own.
        let reaped = cgroups.reap_dead(|name| session::is_alive(&runs, name));
        if reaped > 0 {
            tracing::warn!(
                sessions = reaped,
                "killed and removed the cgroups of runs left by dead harness processes"
            );
        }
        let session = session::Session::open(&runs, agent_uid).map_err(Error::RunDir)?;
        cgroups
            .open_session(session.name())
            .map_err(Error::RunDir)?;
        if root {
            stick_shared_dirs();
        }
        let (private_tmp, network_none) = if root {
            sandbox::probe_namespaces()
        } else {
            (false, false)
        };
        let private_tmp = private_tmp && cfg.private_tmp;
        // Exported from the start (at 0), so that alerts on it have a series to read.
        crate::telemetry::metrics().oom_kills.add(0, &[]);
        let isolation = Isolation {
            mode: match cgroups.mode() {
                "none" => "rlimit",
                m => m,
            },
            uid_per_run: uids.is_some(),
            shared_user: !root,
            cgroup_memory: cgroups.memory(),
            cgroup_pids: cgroups.pids(),
            cgroup_cpu: cgroups.cpu(),
            cgroup_kill: cgroups.kill(),
            private_tmp,
            network_none,
        };
        Ok(Executor {
            python: python.clone(),
            run_as,
            kill_grace: Duration::from_secs(cfg.kill_grace_s),
            output_limit: (cfg.output_limit_kb * 1024) as usize,
            max_processes: cfg.max_processes,
            max_file_bytes: cfg.max_file_mb * 1024 * 1024,
            tmp_mb: cfg.tmp_mb,
            default_timeout: Duration::from_secs(cfg.default_timeout_s),
            default_memory_mb: cfg.max_memory_mb,
            default_cpu_percent: cfg.max_cpu_percent,
            isolation,
            envs: std::sync::Arc::new(pyenv::Environments::new(envs_dir()?, python.clone())),
            fork_server: cfg
                .fork_server
                .then(|| std::sync::Arc::new(forkserver::ForkServer::new(&python))),
            host: std::sync::Arc::new(Host {
                session,
                cgroups,
                uids,
            }),
        })
    }

    /// The interpreter of the environment built for `requirements` (cached per host by the
    /// hash of the interpreter and the text); the error is the installer's. As root the build
    /// runs as a run uid (or `run_as`), never as root.
    pub async fn environment(&self, requirements: &str) -> Result<PathBuf, String> {
        let envs = self.envs.clone();
        let host = self.host.clone();
        let run_as = self
            .run_as
            .as_ref()
            .map(|u| (u.uid.as_raw(), u.gid.as_raw()));
        let requirements = requirements.to_string();
        tokio::task::spawn_blocking(move || {
            let lease = match &host.uids {
                Some(pool) => Some(pool.lease().map_err(|e| e.to_string())?),
                None => None,
            };
            let builder = lease.as_ref().map(|l| (l.uid, l.uid)).or(run_as);
            let built = envs.ensure(&requirements, builder);
            if let Some(lease) = lease {
                // Whatever the build left running (a package's build script) goes.
                if uids::kill_uid(lease.uid).is_some() {
                    lease.release();
                }
            }
            built
        })
        .await
        .map_err(|e| format!("the environment build panicked: {e}"))?
    }

    /// The account agents run as (`None`: the harness's own).
    pub fn run_as(&self) -> Option<&str> {
        self.run_as.as_ref().map(|u| u.name.as_str())
    }

    /// Checks that Python source compiles and defines a top-level `class Agent`, without
    /// running it. Returns the interpreter's message when it does not.
    pub async fn check_python(&self, code: &str) -> Result<(), String> {
        const CHECK: &str = "import ast, sys\n\
            src = sys.stdin.read()\n\
            try:\n    tree = ast.parse(src, 'agent.py')\n    compile(tree, 'agent.py', 'exec')\n\
            except SyntaxError as e:\n    print('line %s: %s' % (e.lineno, e.msg)); sys.exit(1)\n\
            if not any(isinstance(n, ast.ClassDef) and n.name == 'Agent' for n in tree.body):\n\
            \x20   print('defines no top-level class Agent'); sys.exit(1)\n";
        let mut child = tokio::process::Command::new(&self.python)
            .args(["-c", CHECK])
            .env_clear()
            .env("PATH", AGENT_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.python.display()))?;
        let mut stdin = child.stdin.take().expect("piped");
        let code = code.to_string();
        let writer = tokio::spawn(async move {
            let _ = stdin.write_all(code.as_bytes()).await;
        });
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .map_err(|_| "checking the code took more than 30 s".to_string())?
            .map_err(|e| e.to_string())?;
        let _ = writer.await;
        if out.status.success() {
            Ok(())
        } else {
            let msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Err(if msg.is_empty() {
                String::from_utf8_lossy(&out.stderr).trim().to_string()
            } else {
                msg
            })
        }
    }

    /// Runs `spec` to the end (success, error or timeout). `Err` only when the run could not
    /// be set up at all.
    pub async fn run(&self, spec: &RunSpec) -> Result<ExecutionResult, Error> {
        let started = Instant::now();
        if spec.network == Network::None && !self.isolation.network_none {
            return Err(Error::NoNetworkNamespace);
        }
        // A uid, a directory, cgroups: a few file operations (after a crash, also a kill).
        let lease = match &self.host.uids {
            // Blocking: file locks, and after a crash a kill.
            Some(_) => {
                let host = self.host.clone();
                let leased = tokio::task::spawn_blocking(move || {
                    host.uids.as_ref().map(uids::UidPool::lease).transpose()
                })
                .await
                .map_err(|e| Error::RunDir(std::io::Error::other(e.to_string())))?;
                leased.map_err(Error::RunDir)?
            }
            None => None,
        };
        let ids = match (&lease, &self.run_as) {
            (Some(l), _) => Some((l.uid, l.uid)),
            (None, Some(u)) => Some((u.uid.as_raw(), u.gid.as_raw())),
            (None, None) => None,
        };
        let run = self.prepare(spec, ids)?;
        let cgroup = if self.host.cgroups.is_empty() {
            None
        } else {
            let name = run.dir.path().file_name().unwrap_or_default();
            let limits = cgroup::Limits {
                memory_bytes: spec.memory_mb * MIB,
                pids: self.max_processes,
                cpu_percent: spec.cpu_percent,
            };
            Some(
                self.host
                    .cgroups
                    .create(self.host.session.name(), &name.to_string_lossy(), limits)
                    .map_err(Error::Cgroup)?,
            )
        };
        let (tmpfs, tmpfs_options) = if self.isolation.private_tmp {
            sandbox::ChildSetup::private_tmp(self.tmp_mb)
        } else {
            (Vec::new(), std::ffi::CString::default())
        };
        let setup = sandbox::ChildSetup {
            cgroup_procs: cgroup
                .as_ref()
                .map(cgroup::RunCgroup::procs_files)
                .unwrap_or_default(),
            tmpfs,
            tmpfs_options,
            new_network: spec.network == Network::None,
            ids,
            limits: Limits {
                // A cgroup bounds the run as a whole; rlimits are the fallback.
                address_space: (!self.isolation.cgroup_memory).then_some(spec.memory_mb * MIB),
                cpu_seconds: (!self.isolation.cgroup_cpu)
                    .then(|| cpu_budget(spec.timeout, spec.cpu_percent)),
                processes: self.nproc_limit(),
                file_bytes: self.max_file_bytes,
                parent: nix::unistd::getpid(),
            },
        };
        // From here on, whatever happens to this future (a cancel, the worker's timeout,
        // shutdown), everything the run started dies: its group, its cgroup, its uid.
        let mut cleanup = Cleanup {
            pgid: Pid::from_raw(0),
            cgroup,
            uid: lease.as_ref().map(|l| l.uid),
            sweep_tmp: lease.is_some() && !self.isolation.private_tmp,
            lease,
        };
        let forked = match self.fork_server_for(spec) {
            Some(server) => self.fork(server, spec, &run, &setup).await?,
            None => None,
        };
        let (mut running, stdout, stderr): (Running, Output, Output) = match forked {
            Some((forked, stdout, stderr)) => (Running::Forked(forked), stdout, stderr),
            None => {
                let mut cmd = self.command(spec, &run);
                // SAFETY: the closure runs in the forked child before exec and only makes
                // system calls on memory prepared before the fork (see `sandbox::ChildSetup`).
                unsafe {
                    cmd.pre_exec(move || setup.apply());
                }
                let mut child = spawner::spawn_if(cmd, spec.gate.clone())
                    .await
                    .map_err(Error::NotStarted)?
                    .map_err(|source| Error::Spawn {
                        program: run.program.display().to_string(),
                        source,
                    })?;
                if let Some(mut stdin) = child.stdin.take() {
                    let input = run.input_text.clone();
                    tokio::spawn(async move {
                        let _ = stdin.write_all(input.as_bytes()).await;
                    });
                }
                let stdout = Box::new(child.stdout.take().expect("piped"));
                let stderr = Box::new(child.stderr.take().expect("piped"));
                (Running::Child(child), stdout, stderr)
            }
        };
        cleanup.pgid = Pid::from_raw(running.pid());
        // Should this process die before the run ends, the next one on this host kills what is
        // left of the group (the direct child dies with us by its parent-death signal).
        let _record = self
            .host
            .session
            .record(run.dir.path(), cleanup.pgid.as_raw())
            .map(RecordGuard)
            .map_err(|e| tracing::warn!(error = %e, "could not record the run's process group"))
            .ok();
        if let Running::Forked(forked) = &running {
            // Nothing of the agent's has run yet: a refusal drops the child (`cleanup`).
            if let Some(gate) = &spec.gate {
                gate.check().map_err(Error::NotStarted)?;
            }
            // Tracked now (`cleanup` kills its group): the agent's code may load. A child
            // that is gone already shows as its exit below.
            if let Err(e) = forked.start().await {
                tracing::debug!(error = %e, "a forked run ended before its start");
            }
        }
        let out = tokio::spawn(capture(
            stdout,
            self.output_limit,
            output::Stream::Stdout,
            spec.output.clone(),
        ));
        let err = tokio::spawn(capture(
            stderr,
            self.output_limit,
            output::Stream::Stderr,
            spec.output.clone(),
        ));
        let owner = ids.map_or(Uid::effective().as_raw(), |(uid, _)| uid);
        // Aborted when dropped: a cancelled run (this future dropped) stops watching too.
        let progress = spec.output.clone().map(|o| {
            AbortOnDrop(tokio::spawn(watch_progress(
                run.progress_path.clone(),
                owner,
                o,
            )))
        });
        let (status, timed_out, refused) =
            self.wait(&mut running, cleanup.pgid, spec.timeout).await;
        if let Some(watch) = progress {
            drop(watch);
            if let Some(o) = &spec.output {
                // The last report of a run that ended between two looks.
                look_at_progress(&run.progress_path, owner, o).await;
            }
        }
        // Whatever the agent left running goes with it.
        let ended = tokio::task::spawn_blocking(move || cleanup.finish())
            .await
            .unwrap_or_else(|_| Ended {
                refused: Some("the clean-up of the run panicked".into()),
                all_dead: false,
                oom: false,
            });
        let refused = if ended.all_dead {
            if let Some(e) = refused {
                tracing::warn!(error = %e, "a signal was refused; the run's cgroup or uid kill ended it");
            }
            None
        } else {
            refused.or(ended.refused)
        };
        if let Some(e) = &refused {
            tracing::error!(error = %e, "a run's processes could not be killed");
        }
        let mut result = ExecutionResult {
            status: ExecStatus::Error,
            result: None,
            error: None,
            stdout: finish_capture(out).await,
            stderr: finish_capture(err).await,
            exit_code: status.and_then(|s| s.code()),
            duration: 0.0,
            permanent: false,
        };
        // A forked run whose end nobody reported: its server died (its children with it).
        let orphaned = status.is_none() && matches!(running, Running::Forked(_));
        if timed_out {
            result.status = ExecStatus::Timeout;
            result.error = Some(timeout_error(spec.timeout, refused.as_deref()));
        } else if orphaned {
            result.error = Some(
                "the fork server died during the run (it was killed), and the run with it; \
                 the next run starts a new server"
                    .into(),
            );
        } else if ended.oom {
            crate::telemetry::metrics().oom_kills.add(1, &[]);
            result.error = Some(format!(
                "memory limit exceeded ({} MB): the kernel killed a process of the run; raise \
                 memory_mb or use less",
                spec.memory_mb
            ));
        } else {
            let path = run.result_path.clone();
            let file_result = tokio::task::spawn_blocking(move || read_result(&path, owner))
                .await
                .unwrap_or_else(|_| Err("reading the result failed".into()));
            interpret(&spec.runtime, status, file_result, &mut result);
            if let Some(hint) = result.error.as_deref().and_then(pyenv::hint) {
                let error = result.error.get_or_insert_default();
                error.push('\n');
                error.push_str(hint);
            }
        }
        result.duration = started.elapsed().as_secs_f64();
        Ok(result)
    }

    /// The run directory (the agent's, 0700), its input, the agent's code, and what to run.
    fn prepare(&self, spec: &RunSpec, ids: Option<(u32, u32)>) -> Result<Prepared, Error> {
        let dir = tempfile::Builder::new()
            .prefix("run-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(self.host.session.dir())
            .map_err(Error::RunDir)?;
        let input = json!({ "config": spec.config, "input": spec.input, "handoff": spec.handoff });
        let input_text = input.to_string();
        let input_path = dir.path().join("input.json");
        let result_path = dir.path().join("result.json");
        let progress_path = dir.path().join("progress.json");
        std::fs::write(&input_path, &input_text).map_err(Error::RunDir)?;
        let code_path = dir.path().join("agent.py");
        let (program, args): (PathBuf, Vec<String>) = match &spec.runtime {
            Runtime::Python { code } => {
                std::fs::write(&code_path, code).map_err(Error::RunDir)?;
                let python = spec.python.clone().unwrap_or_else(|| self.python.clone());
                (python, vec!["-c".into(), RUNNER.into()])
            }
            Runtime::Command { argv } => {
                let first = argv
                    .first()
                    .ok_or_else(|| Error::NoProgram(String::new()))?;
                let program = find_program(first)?;
                if !executable_by(&program, ids) {
                    return Err(Error::NotExecutable {
                        path: program.display().to_string(),
                        user: self.account(ids),
                    });
                }
                (program, argv[1..].to_vec())
            }
        };
        if let Some((uid, gid)) = ids {
            for entry in [dir.path(), &input_path] {
                std::os::unix::fs::chown(entry, Some(uid), Some(gid)).map_err(Error::RunDir)?;
            }
            if code_path.exists() {
                std::os::unix::fs::chown(&code_path, Some(uid), Some(gid))
                    .map_err(Error::RunDir)?;
            }
        }
        Ok(Prepared {
            dir,
            input_text,
            input_path,
            result_path,
            progress_path,
            program,
            args,
        })
    }

    /// The command of a run: a scrubbed environment, its own process group; a command also
    /// gets its input on stdin (and in `HARNESS_INPUT` when small). The account, cgroups and
    /// namespaces are the child set-up's (see `sandbox`).
    fn command(&self, spec: &RunSpec, run: &Prepared) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&run.program);
        cmd.args(&run.args)
            .current_dir(run.dir.path())
            .env_clear()
            .envs(run_env(spec, run))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if matches!(spec.runtime, Runtime::Command { .. }) {
            cmd.stdin(Stdio::piped());
        } else {
            cmd.stdin(Stdio::null());
        }
        cmd
    }

    /// The fork server for `spec`'s run: a Python agent on the executor's own interpreter
    /// whose environment sets nothing the interpreter reads only as it starts (`PYTHON*`,
    /// the locale, the time zone, the home that holds user site-packages).
    fn fork_server_for(&self, spec: &RunSpec) -> Option<&forkserver::ForkServer> {
        let server = self.fork_server.as_deref()?;
        let read_at_start = |k: &String| {
            k.starts_with("PYTHON")
                || k.starts_with("LC_")
                || ["LANG", "LANGUAGE", "TZ", "HOME"].contains(&k.as_str())
        };
        let python = matches!(spec.runtime, Runtime::Python { .. })
            && spec.python.as_ref().is_none_or(|p| *p == self.python)
            && !spec.env.keys().any(read_at_start);
        python.then_some(server)
    }

    /// Forks the run from the fork server, isolated as `setup` says. `None`: the server is
    /// unavailable and nothing of the run started (start it the old way).
    async fn fork(
        &self,
        server: &forkserver::ForkServer,
        spec: &RunSpec,
        run: &Prepared,
        setup: &sandbox::ChildSetup,
    ) -> Result<Option<(forkserver::Forked, Output, Output)>, Error> {
        let io = |source: std::io::Error| Error::Spawn {
            program: run.program.display().to_string(),
            source,
        };
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| io(e.into()));
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let env = run_env(spec, run);
        let request = |parent| setup.fork_request(parent, run.dir.path(), &env);
        match server.fork(request, &out_w, &err_w).await {
            Ok(forked) => {
                // The child has its copies; ours would keep the pipes open after it ends.
                drop((out_w, err_w));
                let reader = |fd| {
                    tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
                        .map(|r| Box::new(r) as Output)
                        .map_err(io)
                };
                Ok(Some((forked, reader(out_r)?, reader(err_r)?)))
            }
            Err(forkserver::NotForked::Setup(why)) => Err(io(std::io::Error::other(why))),
            Err(forkserver::NotForked::Unavailable(why)) => {
                tracing::debug!(reason = %why, "a Python run starts its own interpreter");
                Ok(None)
            }
        }
    }

    /// Waits for the run's end, or its timeout: then SIGTERM to the group, `kill_grace`, and
    /// SIGKILL. Returns the exit status (if it could be read), whether it timed out, and a
    /// signal the system refused (the harness lacks the right to signal the agent, e.g. no
    /// CAP_KILL): then the run is given up after a second grace instead of waited for.
    async fn wait(
        &self,
        child: &mut Running,
        pgid: Pid,
        timeout: Duration,
    ) -> (Option<ExitStatus>, bool, Option<String>) {
        tokio::select! {
            s = child.wait() => (s, false, None),
            _ = tokio::time::sleep(timeout) => {
                let refused = signal_group(pgid, Signal::SIGTERM).err();
                if let Ok(s) = tokio::time::timeout(self.kill_grace, child.wait()).await {
                    return (s, true, refused);
                }
                let refused = signal_group(pgid, Signal::SIGKILL).err().or(refused);
                match tokio::time::timeout(self.kill_grace, child.wait()).await {
                    Ok(s) => (s, true, refused),
                    Err(_) => (
                        None,
                        true,
                        Some(refused.unwrap_or_else(|| "SIGKILL did not end it".into())),
                    ),
                }
            }
        }
    }

    /// The pid of the fork server Python runs are forked from, once one runs.
    pub fn fork_server_pid(&self) -> Option<i32> {
        self.fork_server.as_ref().and_then(|s| s.pid())
    }

    /// The account a run with `ids` runs as, in words.
    fn account(&self, ids: Option<(u32, u32)>) -> String {
        match (ids, &self.run_as) {
            (None, _) => format!("the harness's own user (uid {})", Uid::effective()),
            (Some((uid, _)), Some(u)) if u.uid.as_raw() == uid => {
                format!("user {} (executor.run_as, uid {uid})", u.name)
            }
            (Some((uid, _)), _) => format!("the run's account (uid {uid}, executor.uid_range)"),
        }
    }

    /// RLIMIT_NPROC counts every process of the account. For a run uid or a dedicated account it is the
    /// agent's ceiling; for our own account, what already runs is added so the agent gets its
    /// share on top.
    fn nproc_limit(&self) -> u64 {
        if Uid::effective().is_root() {
            self.max_processes
        } else {
            count_processes(Uid::effective()) + self.max_processes
        }
    }
}

/// Runs Python `code` defining `class Agent` with `config`, the default limits of `executor`,
/// and `timeout`: one sandboxed run without a queue, for library users.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use harness::executor::{ExecStatus, Executor, execute_agent_code};
/// let executor = Executor::new(&harness::Config::default().executor).unwrap();
/// let code = "class Agent:\n    def execute(self):\n        return {'ok': True}\n";
/// let r = execute_agent_code(&executor, code, serde_json::json!({}), Duration::from_secs(10))
///     .await
///     .unwrap();
/// assert_eq!(r.status, ExecStatus::Success);
/// # })
/// ```
pub async fn execute_agent_code(
    executor: &Executor,
    code: &str,
    config: Value,
    timeout: Duration,
) -> Result<ExecutionResult, Error> {
    let mut spec = RunSpec::new(
        Runtime::Python {
            code: code.to_string(),
        },
        executor,
    );
    spec.config = config;
    spec.timeout = timeout;
    executor.run(&spec).await
}

/// Where run directories live. As root, `/run/harness`: outside every place a run gets a
/// private tmpfs over (`/tmp` would hide the run's own directory from it), shared by the
/// replicas of the host (the uid leases are there). Otherwise `<tmp>/harness-runs-<uid>`.
/// Either is ours and not a symlink (a local user could plant one in a shared directory),
/// mode 0711 so that the agent account can enter the run directory it is given.
fn runs_dir() -> Result<PathBuf, Error> {
    let dir = if Uid::effective().is_root() {
        let parent = Path::new("/run");
        if !parent.is_dir() {
            std::fs::create_dir_all(parent).map_err(Error::RunDir)?;
        }
        parent.join("harness")
    } else {
        std::env::temp_dir().join(format!("harness-runs-{}", Uid::effective()))
    };
    own_dir(&dir, 0o711)?;
    Ok(dir)
}

/// `dir`, created when missing, checked to be a directory of ours and not a symlink (a
/// local user could plant one in a shared directory), with `mode`.
fn own_dir(dir: &Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() && m.uid() == Uid::effective().as_raw() => {}
        Ok(_) => {
            return Err(Error::RunDir(std::io::Error::other(format!(
                "{} exists but is not a directory of ours; remove it",
                dir.display()
            ))));
        }
        Err(_) => match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::RunDir(std::io::Error::new(
                    e.kind(),
                    format!("cannot create {}: {e}", dir.display()),
                )));
            }
        },
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(Error::RunDir)
}

/// Where Python environments are cached: `/var/lib/harness/envs` as root (kept across
/// restarts), else `<tmp>/harness-envs-<uid>`. Runs execute what is there, so no other account
/// may change it or the directory that holds it: ours, not a symlink, and a parent that we
/// own loses any group or world write bit (a Kubernetes emptyDir is 0777).
fn envs_dir() -> Result<PathBuf, Error> {
    use std::os::unix::fs::MetadataExt;
    let dir = if Uid::effective().is_root() {
        PathBuf::from("/var/lib/harness/envs")
    } else {
        std::env::temp_dir().join(format!("harness-envs-{}", Uid::effective()))
    };
    let me = Uid::effective().as_raw();
    if let Some(parent) = dir.parent()
        && Uid::effective().is_root()
    {
        std::fs::create_dir_all(parent).map_err(Error::RunDir)?;
        let meta = std::fs::symlink_metadata(parent).map_err(Error::RunDir)?;
        if meta.uid() == me && meta.mode() & 0o022 != 0 {
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                .map_err(Error::RunDir)?;
        }
    }
    own_dir(
        &dir,
        if Uid::effective().is_root() {
            0o755
        } else {
            0o700
        },
    )?;
    Ok(dir)
}

/// Gives a sticky bit to the places every account may write that lack it (a Kubernetes
/// emptyDir on /tmp is 0777): without it, one run's uid could delete or replace another's
/// files there.
fn stick_shared_dirs() {
    use std::os::unix::fs::MetadataExt;
    for dir in sandbox::SHARED_WRITABLE {
        if let Ok(meta) = std::fs::symlink_metadata(dir)
            && meta.is_dir()
            && meta.mode() & 0o002 != 0
            && meta.mode() & 0o1000 == 0
        {
            let mode = (meta.mode() & 0o7777) | 0o1000;
            match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)) {
                Ok(()) => tracing::info!(dir, "gave a world-writable directory its sticky bit"),
                Err(e) => {
                    tracing::warn!(dir, error = %e, "a world-writable directory has no sticky bit and could not get one")
                }
            }
        }
    }
}

/// Removes a run's process-group record when dropped (after the group is dead).
struct RecordGuard(PathBuf);

impl Drop for RecordGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A run set up and not yet started. The directory goes when this is dropped.
struct Prepared {
    dir: tempfile::TempDir,
    input_text: String,
    input_path: PathBuf,
    result_path: PathBuf,
    progress_path: PathBuf,
    program: PathBuf,
    args: Vec<String>,
}

/// The environment of a run: a scrubbed one (see the module's documentation), the agent's
/// `env` over it; a command also gets its input in `HARNESS_INPUT` when small.
fn run_env(spec: &RunSpec, run: &Prepared) -> Vec<(String, String)> {
    let path = |p: &Path| p.display().to_string();
    let mut env = vec![
        ("PATH".to_string(), AGENT_PATH.to_string()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TZ".into(), "UTC".into()),
        ("HOME".into(), path(run.dir.path())),
        ("HARNESS_RESULT_FILE".into(), path(&run.result_path)),
        ("HARNESS_INPUT_FILE".into(), path(&run.input_path)),
        ("HARNESS_PROGRESS_FILE".into(), path(&run.progress_path)),
        (
            "HARNESS_PERMANENT_EXIT_CODE".into(),
            PERMANENT_EXIT_CODE.to_string(),
        ),
    ];
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(tp) = &spec.traceparent {
        env.push(("TRACEPARENT".into(), tp.clone()));
    }
    if matches!(spec.runtime, Runtime::Command { .. }) {
        if run.input_text.len() <= MAX_ENV_INPUT {
            env.push(("HARNESS_INPUT".into(), run.input_text.clone()));
        }
    } else {
        // Prints reach `harness logs --follow` as they happen, not when a buffer fills.
        env.push(("PYTHONUNBUFFERED".into(), "1".into()));
    }
    env
}

/// A run's stdout or stderr, read by `capture`.
type Output = Box<dyn AsyncRead + Unpin + Send>;

/// A started run: an exec'd child of ours, or a child of the fork server.
enum Running {
    Child(tokio::process::Child),
    Forked(forkserver::Forked),
}

impl Running {
    fn pid(&self) -> i32 {
        match self {
            Running::Child(c) => c.id().map_or(0, |p| p as i32),
            Running::Forked(f) => f.pid,
        }
    }

    /// The run's end (`None`: its status could not be read).
    async fn wait(&mut self) -> Option<ExitStatus> {
        match self {
            Running::Child(c) => c.wait().await.ok(),
            Running::Forked(f) => f.wait().await,
        }
    }
}

/// What a finished run (not timed out) amounts to: a Python agent succeeds when its runner
/// wrote `{"ok": true, ...}` and it exited 0; a command succeeds on exit 0, with the result
/// file or else its last stdout line that is a JSON object (`{}` when neither).
fn interpret(
    runtime: &Runtime,
    status: Option<ExitStatus>,
    file_result: Result<Option<Value>, String>,
    result: &mut ExecutionResult,
) {
    let exit_code = result.exit_code;
    match (runtime, file_result) {
        (_, Err(e)) => result.error = Some(e),
        (Runtime::Python { .. }, Ok(Some(v))) => {
            if v["ok"] == json!(true) && exit_code == Some(0) {
                result.status = ExecStatus::Success;
                result.result = Some(v["result"].clone());
            } else {
                result.permanent = v["permanent"] == json!(true);
                result.error = Some(
                    v["error"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| describe_exit(status, &result.stderr)),
                );
            }
        }
        (Runtime::Python { .. }, Ok(None)) => {
            result.error = Some(format!(
                "the agent ended without a result: {}",
                describe_exit(status, &result.stderr)
            ));
        }
        (Runtime::Command { .. }, Ok(from_file)) => {
            let from_stdout = result
                .stdout
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .and_then(|l| serde_json::from_str::<Value>(l).ok())
                .filter(Value::is_object);
            let value = from_file.or(from_stdout);
            if exit_code == Some(0) {
                result.status = ExecStatus::Success;
                result.result = Some(value.unwrap_or_else(|| json!({})));
            } else {
                result.result = value;
                result.permanent = exit_code == Some(PERMANENT_EXIT_CODE);
                result.error = Some(describe_exit(status, &result.stderr));
            }
        }
    }
}

/// What a timed-out run's error says: the group was terminated, or why it could not be.
fn timeout_error(timeout: Duration, refused: Option<&str>) -> String {
    let after = timeout.as_secs_f64();
    match refused {
        None => format!("timed out after {after:.3}s; the process group was terminated"),
        Some(e) => format!(
            "timed out after {after:.3}s, and the process group could not be killed ({e}); it \
             may still be running"
        ),
    }
}

/// Sends `sig` to a run's process group. A group that is already gone is fine; a refusal is
/// an error that says what the harness lacks.
fn signal_group(pgid: Pid, sig: Signal) -> Result<(), String> {
    match killpg(pgid, sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(nix::errno::Errno::EPERM) => Err(format!(
            "{sig} to process group {pgid}: EPERM, the harness may not signal the agent's \
             account (it needs CAP_KILL when it runs as root without it)"
        )),
        Err(e) => Err(format!("{sig} to process group {pgid}: {e}")),
    }
}

/// Everything a started run holds: its process group, cgroups and uid. `finish` (or a drop,
/// when the run's future is dropped) kills all that the run started and gives the uid back.
struct Cleanup {
    pgid: Pid,
    cgroup: Option<cgroup::RunCgroup>,
    uid: Option<u32>,
    /// Remove what the run's uid left in the shared temporary places (no private tmpfs).
    sweep_tmp: bool,
    lease: Option<uids::Lease>,
}

/// How the clean-up went.
struct Ended {
    /// A kill the system refused, when something of the run may still live.
    refused: Option<String>,
    /// Everything of the run is known dead (its cgroup emptied, or its uid's processes
    /// killed): signals the system refused before did not matter.
    all_dead: bool,
    /// The memory cgroup's OOM killer killed a process of the run.
    oom: bool,
}

impl Cleanup {
    /// Kills the run's group, cgroup and uid, removes its files from shared temporary places
    /// and releases the uid. Blocking.
    fn finish(mut self) -> Ended {
        self.end()
    }

    fn end(&mut self) -> Ended {
        let mut ended = Ended {
            refused: None,
            all_dead: false,
            oom: false,
        };
        if self.pgid.as_raw() > 1 {
            ended.refused = signal_group(self.pgid, Signal::SIGKILL).err();
        }
        let mut emptied = false;
        if let Some(cg) = self.cgroup.take() {
            ended.oom = cg.oom_killed();
            emptied = cg.kill_all();
            if !emptied {
                ended.refused.get_or_insert_with(|| {
                    "the run's cgroup still had processes after a second of killing".into()
                });
            }
        }
        if let Some(uid) = self.uid.take() {
            // The uid is the run's alone: whatever runs as it (a `setsid` escapee on a host
            // without cgroups) is the run's.
            if !emptied {
                emptied = uids::kill_uid(uid).is_some();
            }
            if self.sweep_tmp {
                remove_files_of(uid);
            }
        }
        if let Some(lease) = self.lease.take() {
            // Marked "in use" until every process of the uid is known dead: the next taker
            // kills what is left before using it.
            if emptied {
                lease.release();
            }
        }
        self.pgid = Pid::from_raw(0);
        ended.all_dead = emptied;
        if emptied {
            ended.refused = None;
        }
        ended
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.lease.is_some() || self.cgroup.is_some() || self.pgid.as_raw() > 1 {
            // A dropped run (a cancel, shutdown): the kill can wait up to a second, so not on
            // the runtime thread that dropped it. The group goes at once all the same.
            if self.pgid.as_raw() > 1 {
                let _ = signal_group(self.pgid, Signal::SIGKILL);
            }
            let mut rest = Cleanup {
                pgid: self.pgid,
                cgroup: self.cgroup.take(),
                uid: self.uid.take(),
                sweep_tmp: self.sweep_tmp,
                lease: self.lease.take(),
            };
            self.pgid = Pid::from_raw(0);
            let _ = std::thread::Builder::new()
                .name("harness-run-cleanup".into())
                .spawn(move || {
                    let ended = rest.end();
                    if let Some(e) = ended.refused {
                        tracing::error!(error = %e, "a dropped run's processes could not be killed");
                    }
                });
        }
    }
}

/// Removes what `uid` left directly in the places every account may write (its processes
/// are dead: nothing can race the removal).
fn remove_files_of(uid: u32) {
    use std::os::unix::fs::MetadataExt;
    for dir in sandbox::SHARED_WRITABLE {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if meta.uid() != uid {
                continue;
            }
            let _ = if meta.is_dir() {
                std::fs::remove_dir_all(entry.path())
            } else {
                std::fs::remove_file(entry.path())
            };
        }
    }
}

/// CPU seconds a run may use: its timeout × its CPU share, at least one second.
pub fn cpu_budget(timeout: Duration, cpu_percent: u32) -> u64 {
    ((timeout.as_secs_f64() * cpu_percent as f64 / 100.0).ceil() as u64).max(1)
}

#[derive(Clone, Copy)]
pub(crate) struct Limits {
    /// RLIMIT_AS, when no memory cgroup bounds the run.
    address_space: Option<u64>,
    /// RLIMIT_CPU, when no cpu cgroup sets the run's rate.
    cpu_seconds: Option<u64>,
    processes: u64,
    file_bytes: u64,
    /// The harness process: the child dies with it.
    parent: Pid,
}

impl Limits {
    pub(crate) fn apply(&self) -> std::io::Result<()> {
        // Set after the uid change (std runs pre_exec last), which would clear it. The child
        // is forked from a thread that lives as long as the process (see `spawner`), so the
        // signal comes when the harness dies, never when a runtime thread retires.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
        if nix::unistd::getppid() != self.parent {
            // The harness died between fork and prctl: nothing would kill us later.
            // ESRCH: no allocation here (the child may not allocate).
            return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
        }
        let set = |r, v: u64| setrlimit(r, v, v).map_err(std::io::Error::from);
        if let Some(bytes) = self.address_space {
            set(Resource::RLIMIT_AS, bytes)?;
        }
        if let Some(seconds) = self.cpu_seconds {
            // Soft limit sends SIGXCPU; the hard limit, a second later, SIGKILL.
            setrlimit(Resource::RLIMIT_CPU, seconds, seconds + 1).map_err(std::io::Error::from)?;
        }
        set(Resource::RLIMIT_NOFILE, 256)?;
        set(Resource::RLIMIT_CORE, 0)?;
        set(Resource::RLIMIT_FSIZE, self.file_bytes)?;
        set(Resource::RLIMIT_NPROC, self.processes)?;
        // No setuid binary can give the agent (or what it runs) more privileges than it has.
        nix::sys::prctl::set_no_new_privs().map_err(std::io::Error::from)?;
        Ok(())
    }
}

fn count_processes(uid: Uid) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                })
                .filter(|e| e.metadata().is_ok_and(|m| m.uid() == uid.as_raw()))
                .count() as u64
        })
        .unwrap_or(0)
}

fn describe_exit(status: Option<ExitStatus>, stderr: &str) -> String {
    use std::os::unix::process::ExitStatusExt;
    let how = match status {
        Some(s) if s.code().is_some() => format!("exit code {}", s.code().unwrap_or(-1)),
        Some(s) => match s.signal() {
            Some(9) => "killed by SIGKILL (a resource limit, e.g. CPU time)".to_string(),
            Some(24) => "killed by SIGXCPU: its CPU-time budget ran out".to_string(),
            Some(25) => "killed by SIGXFSZ: it wrote a file over the size limit".to_string(),
            Some(sig) => format!("killed by signal {sig}"),
            None => "ended".to_string(),
        },
        None => "its status could not be read".to_string(),
    };
    let tail: String = stderr
        .lines()
        .rev()
        .take(20)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    if tail.is_empty() {
        how
    } else {
        format!("{how}; stderr:\n{tail}")
    }
}

/// The result file: `Ok(None)` when absent, an error when unsafe, too large or not JSON.
///
/// The agent controls its run directory, so the harness (possibly root) must not trust what
/// it finds there: the file is opened without following symlinks and without blocking (a
/// FIFO), must be a regular file owned by the agent's account (or by us), and is read through
/// a size cap whatever `stat` claimed (`/proc` files report size 0). Blocking: call it from
/// `spawn_blocking`.
fn read_result(path: &Path, owner: u32) -> Result<Option<Value>, String> {
    let Some(text) = read_owned(path, owner, MAX_RESULT_BYTES, "result")? else {
        return Ok(None);
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        if e.to_string().contains("recursion limit") {
            // serde_json's depth limit keeps a hostile result from overflowing our stack.
            "the result is nested deeper than 128 levels, which the harness does not accept"
                .to_string()
        } else {
            format!("the result is not valid JSON: {e}")
        }
    })
}

/// A file the run wrote in its directory (`what`: "result", "progress report"), read only
/// if it is a regular file of the run's account (`owner`) or ours — never through a
/// symlink — and at most `max` bytes.
fn read_owned(path: &Path, owner: u32, max: u64, what: &str) -> Result<Option<String>, String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "the {what} file cannot be read safely ({e}); it must be a regular file"
            ));
        }
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot inspect the {what}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("the {what} file is not a regular file"));
    }
    // The run's own file: of its account (ours only when the run has none of its own), and
    // not a hard link to a file elsewhere (a link to a file the harness may read).
    let ours = Uid::effective().as_raw();
    if meta.uid() != owner && !(owner == ours && meta.uid() == ours) {
        return Err(format!("the {what} file belongs to another account"));
    }
    if meta.nlink() != 1 {
        return Err(format!(
            "the {what} file is a hard link to another file, which the harness does not read"
        ));
    }
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the {what}: {e}"))?;
    if text.len() as u64 > max {
        return Err(format!(
            "the {what} is over {max} bytes, which the harness does not accept"
        ));
    }
    Ok(Some(text))
}

/// Reads a stream to its end: keeps its head and tail for the result, and hands every byte
/// to `live` (which bounds what it keeps the same way).
async fn capture(
    mut r: impl AsyncRead + Unpin,
    limit: usize,
    stream: output::Stream,
    live: Option<std::sync::Arc<output::RunOutput>>,
) -> output::HeadTail {
    let mut kept = output::HeadTail::new(limit);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.push(&buf[..n]);
                if let Some(live) = &live {
                    live.push(stream, &buf[..n]);
                }
            }
        }
    }
    kept
}

async fn finish_capture(h: tokio::task::JoinHandle<output::HeadTail>) -> String {
    // The group is dead, so the pipes close; the timeout guards against a descendant that
    // escaped the group still holding them.
    match tokio::time::timeout(Duration::from_secs(5), h).await {
        Ok(Ok(kept)) => kept.text(),
        _ => "[output unavailable: a process outside the agent's group kept it open]".to_string(),
    }
}

/// A task that ends when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often a running agent's progress file is looked at.
const PROGRESS_POLL: Duration = Duration::from_millis(200);

/// Looks at the run's progress file every [`PROGRESS_POLL`] while it runs.
async fn watch_progress(path: PathBuf, owner: u32, live: std::sync::Arc<output::RunOutput>) {
    loop {
        tokio::time::sleep(PROGRESS_POLL).await;
        look_at_progress(&path, owner, &live).await;
    }
}

/// One look at the progress file (off the runtime threads): a valid report goes to `live`,
/// which keeps it only when it changed.
async fn look_at_progress(path: &Path, owner: u32, live: &output::RunOutput) {
    let path = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        read_owned(
            &path,
            owner,
            output::MAX_PROGRESS_BYTES as u64,
            "progress report",
        )
    })
    .await;
    if let Ok(Ok(Some(text))) = read {
        match output::Progress::parse(&text) {
            Ok(progress) => live.set_progress(progress),
            Err(e) => tracing::debug!(error = %e, "an unreadable progress report"),
        }
    }
}

/// Whether the account `ids` (uid, gid; none: ours) can execute `path`.
fn executable_by(path: &Path, ids: Option<(u32, u32)>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some((uid, gid)) = ids else {
        return nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok();
    };
    let can = |meta: &std::fs::Metadata, bit_user: u32, bit_group: u32, bit_other: u32| {
        let mode = meta.mode();
        if meta.uid() == uid {
            mode & bit_user != 0
        } else if meta.gid() == gid {
            mode & bit_group != 0
        } else {
            mode & bit_other != 0
        }
    };
    let Ok(real) = path.canonicalize() else {
        return false;
    };
    let dirs_ok = real
        .ancestors()
        .skip(1)
        .all(|d| std::fs::metadata(d).is_ok_and(|m| can(&m, 0o100, 0o010, 0o001)));
    dirs_ok && std::fs::metadata(&real).is_ok_and(|m| can(&m, 0o100, 0o010, 0o001))
}

/// The interpreter agents use: an absolute path as configured, else the first match on
/// PATH that the agent account can execute (a version manager's shim under root's home is
/// skipped when agents run as `nobody`), resolved to the real executable.
fn resolve_python(configured: &str, ids: Option<(u32, u32)>, who: &str) -> Result<PathBuf, Error> {
    let candidates: Vec<PathBuf> = if configured.contains('/') {
        vec![PathBuf::from(configured)]
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        for d in AGENT_PATH.split(':') {
            dirs.push(PathBuf::from(d));
        }
        dirs.into_iter().map(|d| d.join(configured)).collect()
    };
    let mut tried = Vec::new();
    for c in candidates {
        if !c.is_file() {
            continue;
        }
        // Shims (pyenv, asdf) are scripts that exec the real interpreter; ask it where it is.
        let real = std::process::Command::new(&c)
            .args(["-c", "import sys; print(sys.executable)"])
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            .filter(|p| p.is_file());
        let Some(real) = real else {
            tried.push(format!("{} (does not run)", c.display()));
            continue;
        };
        if executable_by(&real, ids) {
            return Ok(real);
        }
        tried.push(format!("{} ({who} cannot execute it)", real.display()));
    }
    Err(Error::NoPython(if tried.is_empty() {
        format!("{configured:?} is not on PATH (looked for {who})")
    } else {
        tried.join(", ")
    }))
}

fn find_program(name: &str) -> Result<PathBuf, Error> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::NoProgram(name.to_string()))
        };
    }
    AGENT_PATH
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::NoProgram(name.to_string()))
}

/// Whether a command's program exists (for validation before an agent is stored).
pub fn program_exists(name: &str) -> bool {
    find_program(name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_budget_is_timeout_times_share() {
        assert_eq!(cpu_budget(Duration::from_secs(60), 50), 30);
        assert_eq!(cpu_budget(Duration::from_secs(10), 100), 10);
        assert_eq!(cpu_budget(Duration::from_millis(500), 1), 1);
    }

    #[test]
    fn describe_exit_names_limits() {
        use std::os::unix::process::ExitStatusExt;
        assert!(describe_exit(Some(ExitStatus::from_raw(24)), "").contains("CPU-time budget"));
        assert!(describe_exit(Some(ExitStatus::from_raw(3 << 8)), "boom").contains("exit code 3"));
    }

    #[tokio::test]
    async fn a_fork_server_that_cannot_start_leaves_runs_to_their_own_interpreter() {
        let mut e = Executor::new(&crate::Config::default().executor).unwrap();
        // An "interpreter" that exits at once: every start of the server fails.
        let broken = std::sync::Arc::new(forkserver::ForkServer::new(Path::new("/bin/false")));
        e.fork_server = Some(broken.clone());
        let code = "import os, sys\nclass Agent:\n    def execute(self):\n        \
                    return {'ppid': os.getppid(), 'preloaded': 'asyncio' in sys.modules}\n";
        for _ in 0..3 {
            let r = e
                .run(&RunSpec::new(Runtime::Python { code: code.into() }, &e))
                .await
                .unwrap();
            assert_eq!(r.status, ExecStatus::Success, "{r:?}");
            let v = r.result.unwrap();
            assert_eq!(v["ppid"], std::process::id(), "{v}");
            assert_eq!(v["preloaded"], false, "{v}");
        }
        assert_eq!(broken.pid(), None);
        assert!(broken.given_up(), "three failed starts give the server up");
    }
}
