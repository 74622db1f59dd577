
# Agent Harness fork server, appended to the runner's definitions (runner.py without its last
# line). One per replica: it has imported the runner, json and asyncio once, and forks one
# child per Python run. It never reads a run's request itself (the child does, after the
# fork), so nothing of one run (its env, its paths) is in the memory the next run is forked
# from.
#
# Protocol, all on SOCK_SEQPACKET sockets:
# - fd 3, from the harness: b"f" with one descriptor, the run's connection (`conn`);
# - on `conn`, from this process: b"pid N" after the fork, b"exit S" (the wait status) when
#   the child ended; from the child: b"ready" once it is isolated, or b"fail <why>" and exit
#   126; from the harness, after "ready": b"go" (the child closes its connection and loads
#   the agent's code; without it, it exits 126);
# - the harness wrote the request on `conn` before the fork: JSON, with the run's stdout and
#   stderr pipes attached.
import ctypes

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_PR_SET_DUMPABLE = 4
# First of all: agents that share our account (a harness that is not root) can neither read
# this process's memory nor trace it, so none can reach into the runs forked after it. And
# nobody traces it already.
if _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
    os._exit(3)
with open("/proc/self/status") as _status:
    if any(l.startswith("TracerPid:") and l.split()[1] != "0" for l in _status):
        os._exit(3)

import asyncio  # noqa: E402,F401 (loaded once here, not in every run)
import atexit  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402,F401 (the runner reports errors with it)

_CONTROL = 3
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38


def _check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, "%s: %s" % (what, os.strerror(e)))


def _serve():
    """Forks a child per request; returns the run's connection in the child, never in the
    server."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    control = socket.socket(fileno=_CONTROL)
    conns = {}
    poller = select.poll()
    poller.register(_CONTROL, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                _reap(conns)
                continue
            msg, fds, _, _ = socket.recv_fds(control, 16, 1)
            if not msg:
                os._exit(0)  # the harness is gone
            if not fds:
                continue
            conn = fds[0]
            try:
                pid = os.fork()
            except OSError as e:
                # This run fails (EAGAIN: a process limit); the server and its runs go on.
                c = socket.socket(fileno=conn)
                try:
                    c.send(("fail fork: %s" % e).encode())
                except OSError:
                    pass
                c.close()
                continue
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                control.detach()
                for c in conns.values():
                    c.detach()
                os.closerange(3, conn)
                os.closerange(conn + 1, 1 << 16)
                return conn
            try:
                os.setpgid(pid, pid)
            except OSError:
                pass  # the child did it first, or is gone already
            c = socket.socket(fileno=conn)
            try:
                c.send(b"pid %d" % pid)
            except OSError:
                pass
            conns[pid] = c


def _reap(conns):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        c = conns.pop(pid, None)
        if c is not None:
            try:
                c.send(b"exit %d" % status)
            except OSError:
                pass
            c.close()


def _become_run(conn):
    """In the child: reads the request, applies every isolation step, and returns when the
    agent's code may load."""
    s = socket.socket(fileno=conn)
    msg, fds, _, _ = socket.recv_fds(s, 1 << 20, 2)
    try:
        req = json.loads(msg)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        # The same steps, in the same order, as the harness's own child set-up (sandbox.rs).
        for path in req["cgroup_procs"]:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        flags = (_CLONE_NEWNS if req["tmpfs"] else 0) | (_CLONE_NEWNET if req["new_network"] else 0)
        if flags:
            _check(_libc.unshare(flags), "unshare")
        if req["tmpfs"]:
            _check(_libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount /")
            options = req["tmpfs_options"].encode()
            for target in req["tmpfs"]:
                _check(
                    _libc.mount(b"tmpfs", target.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options),
                    "mount tmpfs on " + target,
                )
        if req["ids"] is not None:
            uid, gid = req["ids"]
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        # After the uid change, which clears it.
        _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != req["parent"]:
            os._exit(126)  # the fork server died before the signal was armed
        limits = req["limits"]
        if limits["address_space"] is not None:
            n = limits["address_space"]
            resource.setrlimit(resource.RLIMIT_AS, (n, n))
        if limits["cpu_seconds"] is not None:
            n = limits["cpu_seconds"]
            resource.setrlimit(resource.RLIMIT_CPU, (n, n + 1))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        n = limits["file_bytes"]
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
        n = limits["processes"]
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        # "" on sys.path is the working directory: forget where it pointed in the server.
        sys.path_importer_cache.pop("", None)
        # Last, as an exec'd run becomes dumpable again only at its exec, after every step:
        # the server is not dumpable, nor is a uid change's result, and a run is (/proc/self
        # is its own).
        _check(_libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
        s.send(b"ready")
    except BaseException as e:
        try:
            s.send(("fail %s" % e).encode("utf-8", "replace")[:4000])
        finally:
            os._exit(126)
    # The agent's code loads only once the harness tracks the run (it has recorded the
    # process group it will kill); a harness that let go of the run first closed the
    # connection: nothing runs.
    try:
        go = s.recv(16)
    except OSError:
        go = b""
    if go != b"go":
        os._exit(126)
    s.close()


def _end():
    """Exits as the interpreter would (non-daemon threads joined, atexit handlers run, stdout
    and stderr flushed) without tearing every module down: in a child of this server that
    teardown rewrites most of the memory shared with it, 25-40 ms here."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)


# What the children share with the server stays out of the collector's passes (which would
# write to every page of it).
gc.freeze()
_become_run(_serve())
_main()
_end()
