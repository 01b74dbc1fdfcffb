"""bench/table18_miniature.py's pieces (the whole run takes minutes, even at its smallest settings):
the four findings of Table 18 computed from a grid, the grid in Table 17's layout, the synthetic
key-value documents of the short model's pretraining, and the steps sized by the probe."""

import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import table18_miniature as t18  # noqa: E402
from eval import haystack_files  # noqa: E402
from model import ModelArgs  # noqa: E402
from train import flops_per_token  # noqa: E402

L = 512
LENGTHS = (L, 2 * L, 4 * L, 6 * L)


def grid_of(rows, positions=t18.POSITIONS):
    """{model: {(length, position): accuracy}} from {model: [accuracy per position] per length}."""
    return {m: {(n, p): a for n, accs in zip(LENGTHS, per_length)
                for p, a in zip(positions, accs)} for m, per_length in rows.items()}


def papers_pattern():
    """The shape of Table 18 (before LCFT within L only; b fails at 2L; linear works to 2L, poor
    at 4L position 0, fails at 6L; 100b works to 4L, partly at 6L), in miniature."""
    ok, none = [1.0] * 5, [0.0] * 5
    return {"short": [ok, none, none, none],
            "short-100b": [[0.9] * 5, [0.1] * 5, none, none],
            "lcft-b": [ok, [0.1, 0.2, 0.1, 0.2, 0.3], none, none],
            "lcft-linear": [ok, [0.95] * 5, [0.02, 0.9, 0.8, 0.9, 1.0], [0.1] * 5],
            "lcft-100b": [ok, [1.0, 0.95, 1.0, 1.0, 1.0], [0.55, 1.0, 0.98, 1.0, 1.0],
                          [0.03, 0.86, 0.86, 0.5, 0.6]]}


def test_the_papers_pattern_reproduces_all_four_findings():
    found = t18.findings(grid_of(papers_pattern()), L)
    assert [yes for _, yes, _ in found] == [True] * 4
    assert "lcft-100b 6L 57%" in found[3][2] and "4L position 0 2%" in found[2][2]


def test_the_papers_own_numbers_reproduce_all_four_findings():
    """Code Llama's numbers at its key positions 0 / 0.2 / 0.4, lengths 4K / 8K / 16K / 24K.
    lcft-100b is Table 17's 7B row (Table 18 names it as its base 1e6 run) and linear scaling's
    16K position 0 is Table 18's 2.34%; the cells sec. 3.3 and App. G.2 state in words only
    ("works only within 4K", "fails at 8K", "works up to 8K", "fails at 24K") are 100 or 0."""
    ok, none = [1.0] * 3, [0.0] * 3
    paper = {"short": [ok, none, none, none],
             "short-100b": [ok, none, none, none],
             "lcft-b": [ok, none, none, none],
             "lcft-linear": [ok, ok, [0.0234, 1.0, 1.0], none],
             "lcft-100b": [ok, [1.0, 0.953, 1.0], [0.547, 1.0, 0.984], [0.031, 0.859, 0.859]]}
    found = t18.findings(grid_of(paper, (0.0, 0.2, 0.4)), L)
    assert [yes for _, yes, _ in found] == [True] * 4
    assert "lcft-100b 4L 84%, lcft-100b 6L 58%" in found[3][2]


def test_models_that_retrieve_nowhere_reproduce_no_finding():
    none = [0.0] * 5
    found = t18.findings(grid_of({m: [none] * 4 for m in t18.MODELS}), L)
    assert [yes for _, yes, _ in found] == [False] * 4


@pytest.mark.parametrize("model, broken", [
    ("short-100b", 0),  # the larger base at inference breaks retrieval even within L
    ("lcft-b", 1),  # LCFT with the old base erased what `short` learnt: not "fails at 2L"
    ("lcft-linear", 2),
    ("lcft-100b", 3),
])
def test_a_model_that_retrieves_nowhere_makes_no_fails_at_kl_finding(model, broken):
    rows = papers_pattern()
    rows[model] = [[0.0] * 5] * 4
    found = t18.findings(grid_of(rows), L)
    assert [yes for _, yes, _ in found] == [i != broken for i in range(4)]


def test_linear_failing_at_6l_counts_only_if_it_retrieves_at_l():
    rows = papers_pattern()
    rows["lcft-linear"][0] = [0.5] * 5  # it lost the skill within L, yet works at 2L
    found = t18.findings(grid_of(rows), L)
    assert [yes for _, yes, _ in found] == [True, True, False, True]


@pytest.mark.parametrize("model, length, accs, broken", [
    ("short", 0, [0.5] * 5, 0),  # the short model does not retrieve within L
    ("short-100b", 1, [0.6] * 5, 0),  # raising the base alone extends retrieval
    ("lcft-b", 1, [0.9] * 5, 1),  # LCFT with the old base retrieves at 2L
    ("lcft-linear", 2, [0.9] * 5, 2),  # linear scaling fine at 4L position 0
    ("lcft-linear", 3, [0.5] * 5, 2),  # and some at 6L
    ("lcft-100b", 2, [0.5] * 5, 3),  # the new base poor at 4L
    ("lcft-100b", 3, [0.0] * 5, 3),  # nothing at 6L
])
def test_each_finding_follows_its_numbers(model, length, accs, broken):
    rows = papers_pattern()
    rows[model][length] = accs
    found = t18.findings(grid_of(rows), L)
    assert [yes for _, yes, _ in found] == [i != broken for i in range(4)]


def test_the_grid_is_laid_out_as_table_17():
    grid = grid_of(papers_pattern())
    about = {m: {"rope_theta": 1250.0 if m != "lcft-100b" else 125000.0,
                 "rope_scale": 4.0 if m == "lcft-linear" else 1.0} for m in grid}
    md = t18.grid_table(grid, about, L, t18.POSITIONS)
    assert md[0] == ("| model | rope_theta | positions / | 512 (1L) | 1024 (2L) | 2048 (4L) | "
                     "3072 (6L) |")
    row = next(r for r in md if r.startswith("| lcft-linear "))
    assert row == ("| lcft-linear | 1250 | 4 | 100.0 / 100.0 / 100.0 / 100.0 / 100.0 | "
                   "95.0 / 95.0 / 95.0 / 95.0 / 95.0 | 2.0 / 90.0 / 80.0 / 90.0 / 100.0 | "
                   "10.0 / 10.0 / 10.0 / 10.0 / 10.0 |")
    assert len(md) == 2 + len(grid)


def test_keyvalue_documents_are_not_the_evaluations_and_ask_each_key_after_it():
    code = "import os\n\n\ndef f(x):\n    return x + 1\n\n\nclass A:\n    y = 2\n\n\nz = f(3)\n"
    files = haystack_files([code] * 3)
    rng = random.Random(0)
    counts, gaps = set(), set()
    for _ in range(200):
        doc = t18.keyvalue_doc(rng, files, 400)
        assert "my_function" not in doc
        assert "used at the end of the file" not in doc  # the evaluation's docstring
        defs = re.findall(r"def (\w+)\(\) -> int:\n(?:    .*\n)?    return (\d+)\n", doc)
        asks = re.findall(r"assert (\w+)\(\) == (\d+)\n", doc)
        # each key defined once and asked once, with its value, after its definition
        assert 2 <= len(defs) <= 6 and len(dict(defs)) == len(defs) and sorted(asks) == sorted(defs)
        for name, value in defs:
            assert len(value) == 2  # two digits, as the evaluation's values
            start = doc.index(f"def {name}()")
            gaps.add(doc.index(f"assert {name}()") - start > 200)
        counts.add(len(defs))
        assert len(doc) >= 400
    assert counts == set(range(2, 7)) and gaps == {True, False}  # near and far lookups


def test_probe_sizes_the_steps_to_the_seconds():
    args = type("Args", (), {"train_seconds": 300.0, "batch_tokens": 65536})()
    margs = ModelArgs.from_name("mini", vocab_size=2048)
    short, long = t18.plan_steps(args, 1e6, margs, L)
    assert short == int(0.6 * 300 * 1e6 / 65536)  # 2746 steps
    # the LCFT runs share the rest, each slower by the FLOPs per token at 4L
    slower = flops_per_token(margs, L) / flops_per_token(margs, 4 * L)
    assert 0.5 < slower < 1 and long == int(0.4 / 3 * 300 * 1e6 * slower / 65536)
