"""scripts/slurm.sh and dedup.py's Slurm path on a real Slurm, submitted as a user types them: a
one-node cluster on this machine (scripts/slurm_cluster.sh: Debian's munge, slurmctld and slurmd),
and a second one whose node has two GPUs in Slurm's books (a count: the runs stay on the CPU).
A one-node job submitted from outside the repository, two processes on a node with two GPUs with
no setting, a requeue that resumes, the refusals, and the dedup chain against the local run.
Skipped, with the reason, where a cluster cannot start (not root, Slurm not installed); failed
instead under CODELLAMA_REQUIRE_SLURM=1, as CI sets (scripts/setup.sh --dev installs Slurm)."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT, STDLIB
from test_train import STEPS, data, flags, metrics  # noqa: F401 (fixtures)

SLURM_SH = ROOT / "scripts" / "slurm.sh"
# one OpenMP thread per process, as tests/test_train.py: the jobs share this machine's two cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def cannot(why):
    if os.environ.get("CODELLAMA_REQUIRE_SLURM") == "1":
        pytest.fail(f"CODELLAMA_REQUIRE_SLURM=1 but {why}", pytrace=False)
    pytest.skip(why)


@contextlib.contextmanager
def cluster_with(gpus):
    """A running one-node Slurm; yields the environment its commands need (SLURM_CONF)."""
    missing = [exe for exe in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(exe)]
    if missing:
        cannot(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install "
                    "slurmctld slurmd slurm-client munge (scripts/setup.sh --dev does, as root)")
    if os.geteuid() != 0:
        cannot("a Slurm cluster of one's own needs root (slurmd starts jobs as their user)")
    folder = tempfile.mkdtemp(prefix="slurm-")  # munged: every folder above its socket enterable
    script = ROOT / "scripts" / "slurm_cluster.sh"
    try:
        r = subprocess.run(["bash", script, "start", folder, str(gpus)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            cannot(f"a one-node Slurm cannot start here: {r.stderr.strip()}")
        yield {**ENV, "SLURM_CONF": f"{folder}/slurm.conf"}
    finally:
        subprocess.run(["bash", script, "stop", folder], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    with cluster_with(0) as env:
        yield env


@pytest.fixture(scope="module")
def gpu_cluster():
    with cluster_with(2) as env:
        yield env


def slurm(env, *args, cwd=None):
    r = subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(map(str, args))}: {r.stderr}"
    return r.stdout


def sbatch(env, cwd, *args):
    return slurm(env, "sbatch", "--parsable", *args, cwd=cwd).strip().split(";")[0]


def state(env, job):
    return re.search(r"JobState=(\S+)", slurm(env, "scontrol", "show", "job", "-o", job))[1]


def wait(env, job, timeout=600):
    deadline = time.time() + timeout
    while (s := state(env, job)) not in DONE:
        assert time.time() < deadline, f"job {job} still {s} after {timeout} s"
        time.sleep(0.5)
    return s


def train(env, cwd, flags, data, *sbatch_flags):
    """`sbatch --nodes 1 scripts/slurm.sh train_code.py ...` from `cwd` (outside the repository,
    --out relative to it); returns the job id."""
    return sbatch(env, cwd, "--nodes", "1", *sbatch_flags, SLURM_SH, "train_code.py", *flags,
                  "--data", data, "--out", "run", "--steps", STEPS)


def log_of(cwd, job):
    return (cwd / f"slurm-{job}.out").read_text()


@pytest.fixture(scope="module")
def one_node(cluster, flags, data, tmp_path_factory):  # noqa: F811
    """The default job on a node without GPUs: one process."""
    cwd = tmp_path_factory.mktemp("submit")
    job = train(cluster, cwd, flags, data)
    assert wait(cluster, job) == "COMPLETED", log_of(cwd, job)[-3000:]
    return cwd, log_of(cwd, job), metrics(cwd / "run")


def test_one_node_job_submitted_from_any_folder(one_node):
    cwd, log, steps = one_node
    assert re.match(r"slurm.sh: job \d+ attempt 1 at .*: 1 node\(s\) x 1 process\(es\), "
                    r"rendezvous localhost:\d+\n", log), log[:300]
    assert "model: 3.5M parameters, 1 process(es) on cpu" in log
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    assert (cwd / "run" / "hf" / "model.safetensors").is_file()


def test_a_node_with_two_gpus_runs_two_processes(gpu_cluster, one_node, flags, data,  # noqa: F811
                                                  tmp_path):
    """No setting: one process per GPU Slurm gave the job (all of the node's: --exclusive); the
    global batch is the same, so are the losses."""
    job = train(gpu_cluster, tmp_path, flags, data)
    done = wait(gpu_cluster, job)
    log = log_of(tmp_path, job)
    assert done == "COMPLETED", log[-3000:]
    assert "1 node(s) x 2 process(es)" in log.splitlines()[0]
    assert "2 process(es) on cpu" in log
    for a, b in zip(one_node[2], metrics(tmp_path / "run"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)


def test_requeue_resumes_and_keeps_both_logs(cluster, one_node, flags, data,  # noqa: F811
                                             tmp_path):
    """Two processes (NPROC_PER_NODE=2) through the c10d rendezvous; `scontrol requeue` after the
    checkpoint of step 4: the second attempt resumes from it, appends to the same log, and no step
    is logged twice."""
    env = {**cluster, "NPROC_PER_NODE": "2"}
    job = train(env, tmp_path, flags, data)
    log = tmp_path / "run" / "metrics.jsonl"
    while not (log.exists() and log.read_text().count("\n") >= 5):
        assert state(cluster, job) in ("PENDING", "RUNNING"), log_of(tmp_path, job)[-3000:]
        time.sleep(0.2)
    slurm(cluster, "scontrol", "requeue", job)
    # Slurm holds a requeued job back for two minutes (its begin time): let it start at once
    deadline = time.time() + 60
    while state(cluster, job) != "PENDING":
        assert time.time() < deadline, "the requeued job never became pending"
        time.sleep(0.2)
    # and the node idle again: released while the first attempt's processes still wind down
    # (node COMPLETING), the second attempt's launch can fail and the job end FAILED
    while slurm(cluster, "sinfo", "-h", "-N", "-o", "%T").split() != ["idle"]:
        assert time.time() < deadline, "the node never became idle after the requeue"
        time.sleep(0.2)
    slurm(cluster, "scontrol", "update", f"JobId={job}", "StartTime=now")
    assert wait(cluster, job) == "COMPLETED", log_of(tmp_path, job)[-3000:]
    text = log_of(tmp_path, job)
    starts = re.findall(r"^slurm.sh: job \d+ attempt (\d) .* 1 node\(s\) x 2 process\(es\)", text,
                        re.M)
    assert starts == ["1", "2"], text[-3000:]
    assert re.search(r"^resumed from \S+step-00000(04|08) \(step [48]\)$",
                     text.split("attempt 2")[1], re.M)
    steps = metrics(tmp_path / "run")
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    for a, b in zip(one_node[2], steps, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)


@pytest.mark.parametrize("sbatch_flags, stage, error", [
    (["--ntasks-per-node=2"], "train_code.py",
     "error: scripts/slurm.sh runs one task per node (torchrun starts its processes), not 2 on 1: "
     "drop --ntasks/--ntasks-per-node; NPROC_PER_NODE=K sets the processes per node"),
    ([], "train_nope.py", "error: no stage script train_nope.py in {cwd} or in " + str(ROOT)),
])
def test_refusals_are_one_line(cluster, tmp_path, sbatch_flags, stage, error):
    script = os.path.relpath(SLURM_SH, tmp_path)  # as typed: ../../work/repo/scripts/slurm.sh
    job = sbatch(cluster, tmp_path, "--nodes", "1", *sbatch_flags, script, stage, "--steps", 1)
    assert wait(cluster, job) == "FAILED"
    assert log_of(tmp_path, job) == error.format(cwd=tmp_path) + "\n"


def test_dedup_chain_matches_the_local_run(cluster, tmp_path, monkeypatch):
    """The 7 stages as job arrays chained by dependencies, their output byte-identical to the local
    run's; what sbatch refuses and an interpreter that cannot run the tasks are one line each and
    submit nothing; a second chain for the same --out is refused while the first is queued; a
    stage that ends without success takes the rest of its chain with it, and re-running submits
    what is left."""
    pytest.importorskip("datatrove", reason="pip install -r requirements-dedup.txt")
    import dedup
    src = tmp_path / "src"
    shutil.copytree(STDLIB / "json", src / "json", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(src / "json", src / "vendored")  # exact duplicates
    fork = (STDLIB / "textwrap.py").read_text().replace("# ", "# (fork) ", 5)  # a near duplicate
    (src / "textwrap.py").write_text((STDLIB / "textwrap.py").read_text())
    (src / "fork.py").write_text(fork)
    local = dedup.dedup([src], tmp_path / "local", workers=1, num_perm=32)
    assert local["exact_duplicates"] == 5 and local["near_duplicates"] == 1, local
    out = tmp_path / "slurm"
    cmd = [sys.executable, ROOT / "dedup.py", "--data", src, "--out", out, "--num-perm", 32]

    def run(*flags):
        r = subprocess.run([str(a) for a in cmd + list(flags)], env=cluster, cwd=tmp_path,
                           capture_output=True, text=True)
        return r.returncode, r.stderr.strip().splitlines()

    code, err = run("--slurm-partition", "nope")
    assert code == 1 and len(err) == 1 and err[0].startswith("error: sbatch refuses the stages' "
                                                             "options --partition=nope"), err
    assert "invalid partition specified: nope" in err[0]
    code, err = run("--slurm-partition", "debug", "--slurm-python", "/usr/bin/nope")
    assert (code, err) == (1, ["error: --slurm-python /usr/bin/nope: No such file or directory"])
    assert not (out / "work" / "slurm").exists()

    code, err = run("--slurm-partition", "debug", "--slurm-options=--comment=codellama")
    assert code == 0, err
    jobs = json.loads((out / "work" / "slurm" / "jobs.json").read_text())
    assert len(jobs) == 7
    assert "Comment=codellama" in slurm(cluster, "scontrol", "show", "job", "-o", jobs[-1])
    code, err = run("--slurm-partition", "debug")
    # the jobs Slurm still holds: the whole chain, or its tail once its first stages are done (a
    # stage of this small input can finish before the second submission)
    held = re.fullmatch(rf"error: {re.escape(str(out))} is being deduplicated by Slurm jobs "
                        r"([\d ]+), still queued or running: wait for them, or scancel them",
                        err[0] if len(err) == 1 else "")
    assert code == 1 and held, err
    held = held[1].split()
    assert held and held == jobs[len(jobs) - len(held):], (held, jobs)
    slurm(cluster, "scancel", held[0])
    for job in jobs:
        wait(cluster, job, timeout=60)  # cancelled with the first one, not waiting for ever

    code, err = run("--slurm-partition", "debug")
    assert code == 0, err
    for job in json.loads((out / "work" / "slurm" / "jobs.json").read_text()):
        assert wait(cluster, job) == "COMPLETED", job
    assert json.loads((out / "summary.json").read_text()) == local
    shards = sorted(p.name for p in (tmp_path / "local").glob("*.jsonl"))
    assert shards and shards == sorted(p.name for p in out.glob("*.jsonl"))
    for name in shards + ["summary.json"]:
        assert (out / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
