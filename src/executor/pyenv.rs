//! Python environments per set of requirements: a virtual environment for the agents that
//! give a `requirements.txt`, built once per host and cached by the hash of the interpreter
//! and the requirements' text.
//!
//! Built with `uv` when it is on the harness's PATH (the PyPI package `uv` ships the
//! binary), else with `python -m venv` and pip. As root the build runs as an unprivileged
//! account (a run uid when there is a pool, else `executor.run_as`): a package's build
//! script never runs as root. Once built, the environment is owned by the harness's user and
//! not writable by any other: runs read and execute it, never change it.
//!
//! Guarantees: an environment is used only once its build finished (`.complete`); one build
//! per hash at a time on a host (a lock file); a failed build leaves nothing behind and its
//! error is the installer's.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// The longest a build may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// A build's process ceiling, largest file, and the output kept to explain a failure.
const BUILD_PROCESSES: u64 = 256;
const BUILD_FILE_BYTES: u64 = 1024 * 1024 * 1024;
const BUILD_OUTPUT_BYTES: usize = 64 * 1024;
/// The largest requirements text accepted.
pub const MAX_REQUIREMENTS_BYTES: usize = 64 * 1024;
/// Marks an environment whose build finished.
const COMPLETE: &str = ".complete";

/// The environments of one host.
#[derive(Debug)]
pub struct Environments {
    dir: PathBuf,
    python: PathBuf,
    /// `sys.version` of `python`, read once (part of the cache key).
    version: OnceLock<String>,
}

/// Who builds: a uid and gid (none: the harness's own user).
pub type Builder = Option<(u32, u32)>;

impl Environments {
    pub fn new(dir: PathBuf, python: PathBuf) -> Environments {
        Environments {
            dir,
            python,
            version: OnceLock::new(),
        }
    }

    /// The environment's directory for `requirements` (built or not).
    fn path_for(&self, requirements: &str) -> PathBuf {
        let version = self.version.get_or_init(|| {
            Command::new(&self.python)
                .args(["-c", "import sys; print(sys.version)"])
                .env_clear()
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        });
        let mut h = Sha256::new();
        h.update(self.python.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(version.as_bytes());
        h.update([0]);
        h.update(requirements.trim().as_bytes());
        let digest = h.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(hex)
    }

    /// The interpreter of the environment for `requirements`, built first when it is not
    /// cached. Blocking (a build takes seconds to minutes). The error is the installer's.
    pub fn ensure(&self, requirements: &str, builder: Builder) -> Result<PathBuf, String> {
        let env = self.path_for(requirements);
        let python = env.join("bin/python");
        if sealed(&env) {
            return Ok(python);
        }
        self.open_dir()
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(env.with_extension("lock"))
            .map_err(|e| format!("cannot lock the environment: {e}"))?;
        lock.lock()
            .map_err(|e| format!("cannot lock the environment: {e}"))?;
        if sealed(&env) {
            return Ok(python); // built by another process meanwhile
        }
        let _ = std::fs::remove_dir_all(&env);
        match self.build(&env, requirements, builder) {
            Ok(()) => {
                let mark = env.join(COMPLETE);
                std::fs::write(&mark, "")
                    .and_then(|()| {
                        std::fs::set_permissions(&mark, std::fs::Permissions::from_mode(0o644))
                    })
                    .map_err(|e| format!("cannot mark the environment built: {e}"))?;
                Ok(python)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&env);
                Err(e)
            }
        }
    }

    fn open_dir(&self) -> std::io::Result<()> {
        if !self.dir.is_dir() {
            std::fs::create_dir_all(&self.dir)?;
        }
        // Runs must reach their environment; nobody but us may add to the cache.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755))
    }

    fn build(&self, env: &Path, requirements: &str, builder: Builder) -> Result<(), String> {
        let work = tempfile::Builder::new()
            .prefix(".build-")
            .tempdir_in(&self.dir)
            .map_err(|e| format!("cannot make a build directory: {e}"))?;
        let req = work.path().join("requirements.txt");
        std::fs::write(&req, requirements).map_err(|e| e.to_string())?;
        std::fs::create_dir(env).map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = builder {
            for p in [work.path(), &req, env] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
            }
        }
        let uv = find_on_path("uv");
        let steps: Vec<Vec<String>> = match &uv {
            Some(uv) => vec![
                vec![
                    uv.display().to_string(),
                    "venv".into(),
                    "--quiet".into(),
                    "--allow-existing".into(),
                    "--python".into(),
                    self.python.display().to_string(),
                    env.display().to_string(),
                ],
                vec![
                    uv.display().to_string(),
                    "pip".into(),
                    "install".into(),
                    "--quiet".into(),
                    "--python".into(),
                    env.join("bin/python").display().to_string(),
                    "-r".into(),
                    req.display().to_string(),
                ],
            ],
            None => vec![
                vec![
                    self.python.display().to_string(),
                    "-m".into(),
                    "venv".into(),
                    env.display().to_string(),
                ],
                vec![
                    env.join("bin/python").display().to_string(),
                    "-m".into(),
                    "pip".into(),
                    "install".into(),
                    "--quiet".into(),
                    "--no-input".into(),
                    "--disable-pip-version-check".into(),
                    "--no-cache-dir".into(),
                    "-r".into(),
                    req.display().to_string(),
                ],
            ],
        };
        for argv in steps {
            run_step(&argv, work.path(), builder)?;
        }
        seal(env, builder.is_some()).map_err(|e| format!("cannot seal the environment: {e}"))
    }
}

/// Runs one build step as `builder`, with a scrubbed environment, to its end or the build
/// timeout. The error is the step's own output (its last lines).
fn run_step(argv: &[String], home: &Path, builder: Builder) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .current_dir(home)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .env("UV_CACHE_DIR", home.join("uv-cache"))
        .env("UV_NO_CONFIG", "1")
        .env("PIP_CONFIG_FILE", "/dev/null")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, killed whole on timeout.
        .process_group(0);
    if let Some((uid, gid)) = builder {
        cmd.uid(uid).gid(gid);
    }
    // A package's build script is untrusted code: it dies with this thread (which waits for
    // it), gets no core dumps, a process ceiling and a file size bound.
    // SAFETY: system calls only, no allocation.
    unsafe {
        cmd.pre_exec(|| {
            use nix::sys::resource::{Resource, setrlimit};
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
            setrlimit(Resource::RLIMIT_NPROC, BUILD_PROCESSES, BUILD_PROCESSES)?;
            setrlimit(Resource::RLIMIT_FSIZE, BUILD_FILE_BYTES, BUILD_FILE_BYTES)?;
            nix::sys::prctl::set_no_new_privs()?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Output is kept to its last part (what says why it failed); the rest is drained.
    let tail_of = |r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut r = r;
            let mut kept: Vec<u8> = Vec::new();
            let mut buf = [0u8; 8192];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > BUILD_OUTPUT_BYTES {
                    kept.drain(..kept.len() - BUILD_OUTPUT_BYTES);
                }
            }
            kept
        })
    };
    let out_tail = tail_of(Box::new(child.stdout.take().expect("piped")));
    let err_tail = tail_of(Box::new(child.stderr.take().expect("piped")));
    let deadline = std::time::Instant::now() + BUILD_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(None) => {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                return Err(format!(
                    "building the environment took over {} s",
                    BUILD_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    // What the step left in its group goes with it.
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let out = std::process::Output {
        status,
        stdout: out_tail.join().unwrap_or_default(),
        stderr: err_tail.join().unwrap_or_default(),
    };
    if out.status.success() {
        return Ok(());
    }
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    Err(format!(
        "{} failed ({}):\n{tail}",
        Path::new(&argv[0])
            .file_name()
            .unwrap_or_default()
            .to_string_lossy(),
        out.status
    ))
}

/// Makes the built environment ours and read-only to others: owned by the harness's user
/// (when another account built it), no write bit for group or others.
fn seal(dir: &Path, chown: bool) -> std::io::Result<()> {
    let me = nix::unistd::Uid::effective().as_raw();
    let group = nix::unistd::Gid::effective().as_raw();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p)?;
        if chown {
            std::os::unix::fs::lchown(&p, Some(me), Some(group))?;
        }
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.mode() & 0o7777 & !0o022 & !0o6000;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode | 0o444))?;
        if meta.is_dir() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode | 0o555))?;
            for entry in std::fs::read_dir(&p)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Whether `env` is a finished environment of ours: its directory and `.complete` belong to
/// this process's user and nobody else may write the directory. Anything else is rebuilt.
fn sealed(env: &Path) -> bool {
    let me = nix::unistd::Uid::effective().as_raw();
    let ours = |p: &Path| {
        std::fs::symlink_metadata(p).is_ok_and(|m| m.uid() == me && m.mode() & 0o022 == 0)
    };
    ours(env) && ours(&env.join(COMPLETE))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A hint for a run that failed on a missing module.
pub fn hint(error: &str) -> Option<&'static str> {
    error.contains("ModuleNotFoundError").then_some(
        "hint: the agent imports a module its interpreter lacks; give the agent its \
         requirements (`harness agents add|update NAME --requirements requirements.txt`, or \
         config.requirements in the API) and the harness builds an environment for it",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_environment_nobody_else_can_change_counts_as_built() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("env");
        std::fs::create_dir(&env).unwrap();
        std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!sealed(&env), "no .complete: not built");
        std::fs::write(env.join(COMPLETE), "").unwrap();
        std::fs::set_permissions(env.join(COMPLETE), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        assert!(sealed(&env));
        // A directory others may write could hold a planted interpreter.
        std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!sealed(&env));
    }
}
