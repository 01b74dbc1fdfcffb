"""train_instruct.py and data.Dialogs (Code Llama - Instruct, sec. 2.5): the loss mask covers
exactly the answers in both chat layouts, the batch mixes instructions and rehearsal as --mix says,
bad records are skipped and counted, long dialogs are cut at a turn boundary or dropped, and a short
run exports, evaluates the chat source, resumes, and chats through sample.py --instruct."""

import gzip
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, STDLIB
from data import IGNORE, Batches, Dialogs, Tokenizer, is_dialogs, prepare
from prompts import chat_tokens, chatml_tokens, dialog_tokens, format_chat


def dialog(i, system=False, pairs=1):
    """A dialog with a long question and a short answer: any 64-token window of it holds some
    question tokens (not targets)."""
    messages = [{"role": "system", "content": "You are a careful calculator."}] if system else []
    for k in range(pairs):
        a, b = i + k, 2 * i + 3
        messages += [{"role": "user", "content": f"Please add the numbers {a} and {b} together, "
                      "then explain in one short sentence how you found the result."},
                     {"role": "assistant", "content": f" The sum of {a} and {b} is {a + b}.\n"}]
    return {"messages": messages}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def runs(ids, mask):
    """The maximal runs of masked-in ids."""
    out, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            out, run = out + [run], []
    return out + ([run] if run else [])


def answers(record):
    return [m["content"] for m in record["messages"] if m["role"] == "assistant"]


# ---- the loss mask ----------------------------------------------------------------------------

def test_llama2_mask_is_the_answers_and_their_eos(llama2_tokenizer, tmp_path):
    tok = Tokenizer.from_pretrained(llama2_tokenizer)
    records = [dialog(1), dialog(2, system=True, pairs=3), dialog(3, pairs=2)]
    chats = Dialogs(write_jsonl(tmp_path / "chat.jsonl", records), tok, seq_len=4096)
    assert (chats.n_docs, chats.records, chats.skipped, chats.truncated) == (3, 3, {}, 0)
    for d, record in enumerate(records):
        ids, mask = chats.tokens(d).tolist(), chats.mask(d).tolist()
        assert (ids, mask) == tuple(map(list, chat_tokens(tok, record["messages"])))
        spans = runs(ids, mask)
        assert [s[-1] for s in spans] == [tok.eos_id] * len(answers(record))
        # the reference's layout: "[INST] {user} [/INST] {answer.strip()} " + EOS
        assert [tok.decode(s[:-1]) for s in spans] == [a.strip() + " " for a in answers(record)]
        assert chats.lang(d) == "chat"
    assert "You are a careful calculator." in tok.decode(chats.tokens(1).tolist())


def test_chatml_mask_is_the_answers_and_their_end_token(smollm2_dir, tmp_path):
    tok = Tokenizer.from_pretrained(smollm2_dir)
    records = [dialog(4, system=True, pairs=2), dialog(5, pairs=3)]
    chats = Dialogs(write_jsonl(tmp_path / "chat.jsonl", records), tok, seq_len=2048)
    end = tok.piece_to_id("<|im_end|>")
    for d, record in enumerate(records):
        ids, mask = chats.tokens(d).tolist(), chats.mask(d).tolist()
        assert (ids, mask) == tuple(map(list, chatml_tokens(tok, record["messages"])))
        assert (ids, mask) == tuple(map(list, dialog_tokens(tok, record["messages"])))
        spans = runs(ids, mask)
        assert [s[-1] for s in spans] == [end] * len(answers(record))
        for s, answer in zip(spans, answers(record)):
            # Encoded as one text with its "assistant\n" header, as the chat template is, the
            # answer's first token may take the header's newline with it: that token is a target.
            text = tok.decode(s[:-1])
            assert text.endswith(answer) and "assistant\n".endswith(text[:-len(answer)] or "\n")
        # SmolLM2's default system turn when the dialog has none, as its template adds it
        assert ("You are a helpful AI assistant" in tok.decode(ids)) == (d == 1)


# ---- rehearsal proportions ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tokenizer, tmp_path_factory):
    """A chat source of 300 dialogs and two prepared plain sources (code, and prose: the email
    package's docstrings as markdown)."""
    tmp = tmp_path_factory.mktemp("sources")
    records = [dialog(i, system=i % 3 == 0, pairs=1 + i % 2) for i in range(300)]
    chat = write_jsonl(tmp / "chat.jsonl", records)
    code = prepare([STDLIB / "email"], tokenizer, tmp / "code", extensions={".py": "python"},
                   progress=False)
    docs = tmp / "docs"
    docs.mkdir()
    import ast
    for f in sorted((STDLIB / "email").glob("*.py")):
        text = ast.get_docstring(ast.parse(f.read_text()))
        if text:
            (docs / f"{f.stem}.md").write_text(f"# {f.stem}\n\n{text}\n")
    prepare([docs], tokenizer, tmp / "nl", progress=False)
    assert code["documents"] > 10
    return chat, tmp / "code", tmp / "nl"


def test_rehearsal_proportions_follow_the_mix(tokenizer, sources):
    from data import Corpus
    tok = Tokenizer.from_pretrained(tokenizer)
    chat, code, nl = sources
    mix, rows, steps = [0.92, 0.06, 0.02], 8, 600
    # dialogs of 68 to 171 tokens, cut across 64-token sequences (no --whole-docs here)
    corpora = [Dialogs(chat, tok, 256), Corpus(code), Corpus(nl)]
    batches = Batches(corpora, mix, 64, rows, seed=0, tok=tok)
    for _ in range(steps):
        before = batches.drawn[0]
        x, y = batches.next()
        # Every 64-token window of a dialog holds question tokens (no target), and a plain source
        # is all targets: the rows with a masked target are exactly the rows of the chat source.
        assert int((y == IGNORE).any(axis=1).sum()) == batches.drawn[0] - before
    n = rows * steps
    for p, drawn in zip(mix, batches.drawn):
        # 4.5 standard deviations of a binomial: a false alarm about once in 150,000 runs
        assert abs(drawn / n - p) <= 4.5 * (p * (1 - p) / n) ** 0.5, (batches.drawn, mix)
    assert sum(batches.drawn) == n


@pytest.mark.parametrize("seq_len", [64, 4096])  # 4,096: the held-out dialogs fill no sequence
def test_held_out_loss_of_a_chat_source_is_on_answers(tokenizer, sources, seq_len):
    tok = Tokenizer.from_pretrained(tokenizer)
    chats = Dialogs(sources[0], tok, 256)
    batches = Batches([chats], [1.0], seq_len, 4, seed=0, tok=tok, eval_docs=16)
    [(s, x, y)] = batches.held_out(8)
    ids = np.concatenate([chats.tokens(int(d)) for d in batches.eval_ids[0]])
    mask = np.concatenate([chats.mask(int(d)) for d in batches.eval_ids[0]])
    # the held-out dialogs, then padding (never a target) to the end of the last sequence
    pad = max(0, x.size + 1 - len(ids))
    assert pad < seq_len and (seq_len == 64 or len(x) == 1 and pad > 0)
    ids = np.concatenate([ids, np.full(pad, tok.eos_id)])
    mask = np.concatenate([mask, np.zeros(pad, bool)])
    flat = slice(1, x.size + 1)
    assert (x.ravel() == ids[:x.size]).all()
    assert ((y.ravel() != IGNORE) == mask[flat]).all() and (y.ravel()[mask[flat]] == ids[flat][
        mask[flat]]).all()


# ---- bad records, truncation --------------------------------------------------------------------

def test_bad_records_are_skipped_and_counted(tokenizer, tmp_path):
    tok = Tokenizer.from_pretrained(tokenizer)
    good = dialog(1)
    lines = [
        good,                                                                     # 1
        "{not json",                                                              # 2 bad_json
        {"text": "a pretraining record"},                                         # 3 no_messages
        {"messages": "hello"},                                                    # 4 no_messages
        {"messages": [{"role": "user", "content": 3}]},                           # 5 bad_message
        {"messages": [{"role": "user", "content": "a"}, "b"]},                    # 6 bad_message
        {"messages": [{"role": "user", "content": "a"},
                      {"role": "user", "content": "b"}]},                         # 7 bad_turns
        {"messages": [{"role": "user", "content": "a question without answer"}]},  # 8 bad_turns
        {"messages": []},                                                         # 9 bad_turns
        {"messages": [{"role": "user", "content": "a [INST] b"},
                      {"role": "assistant", "content": "c"}]},                    # 10 reserved
        {"messages": [{"role": "system", "content": "<<SYS>>"},
                      {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "c"}]},                    # 11 reserved
        "",                                                                       # 12 (blank)
        dialog(2, system=True),                                                   # 13
        "[1, 2]",                                                                 # 14 no_messages
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", lines)
    chats = Dialogs(path, tok, 512)
    assert chats.records == 13 and chats.n_docs == 2
    assert chats.skipped == {"bad_json": 1, "no_messages": 3, "bad_message": 2, "bad_turns": 3,
                             "reserved_tag": 2}
    assert chats.lines == {"bad_json": [2], "no_messages": [3, 4, 14], "bad_message": [5, 6],
                           "bad_turns": [7, 8, 9], "reserved_tag": [10, 11]}
    summary = chats.summary()
    assert "13 records, 2 dialogs kept" in summary and "no_messages 3 (line 3, 4, 14)" in summary
    # the same file gzipped reads the same
    gz = tmp_path / "chat.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert is_dialogs(gz) and Dialogs(gz, tok, 512).skipped == chats.skipped


def test_empty_or_all_invalid_file_is_a_clear_error(tokenizer, tmp_path):
    tok = Tokenizer.from_pretrained(tokenizer)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(ValueError, match=r"empty\.jsonl: no dialog to train on \(0 records"):
        Dialogs(empty, tok, 512)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}]},
                                               "oops", {"messages": "x"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: no dialog to train on \(3 records, 0 "
                                         r"dialogs kept.*bad_json 1 \(line 2\).*bad_turns 1"):
        Dialogs(bad, tok, 512)


def test_chat_source_detection(tokenizer, tmp_path):
    assert is_dialogs(write_jsonl(tmp_path / "a.jsonl", ["", dialog(1)]))
    assert not is_dialogs(write_jsonl(tmp_path / "b.jsonl", [{"text": "code"}]))
    assert not is_dialogs(tmp_path)  # a directory of sources
    with pytest.raises(ValueError, match=r"c\.jsonl:2: not a JSON record.*nor is any other"):
        is_dialogs(write_jsonl(tmp_path / "c.jsonl", ["", "{oops", "[1]"]))
    # the first valid record decides, wherever it is: a bad first line is skipped and counted
    # like any other bad line
    d = write_jsonl(tmp_path / "d.jsonl", ["{oops", "[1]", dialog(1), "{oops"])
    assert is_dialogs(d)
    assert not is_dialogs(write_jsonl(tmp_path / "e.jsonl", ["{oops", {"text": "code"}]))
    tok = Tokenizer.from_pretrained(tokenizer)
    chats = Dialogs(d, tok, 512)
    assert chats.n_docs == 1 and chats.lines == {"bad_json": [1, 4], "no_messages": [2]}
    assert "bad_json 2 (line 1, 4)" in chats.summary()


def test_long_dialogs_are_cut_at_a_turn_boundary_or_dropped(tokenizer, tmp_path):
    tok = Tokenizer.from_pretrained(tokenizer)
    three = dialog(7, system=True, pairs=3)["messages"]
    sizes = [len(dialog_tokens(tok, three[:1 + 2 * k])[0]) for k in (1, 2, 3)]
    seq_len = sizes[1] + 1  # two pairs fit, three do not
    huge = {"messages": [{"role": "user", "content": "long question " * 200},
                         {"role": "assistant", "content": "a"}]}
    fits = dialog(8)
    chats = Dialogs(write_jsonl(tmp_path / "chat.jsonl", [{"messages": three}, huge, fits]), tok,
                    seq_len)
    assert chats.n_docs == 2 and chats.truncated == 1 and chats.skipped == {"too_long": 1}
    assert chats.lines == {"truncated": [1], "too_long": [2]}
    assert chats.tokens(0).tolist() == dialog_tokens(tok, three[:5])[0]  # system + two pairs
    assert chats.mask(0).tolist() == dialog_tokens(tok, three[:5])[1]
    assert chats.tokens(1).tolist() == dialog_tokens(tok, fits["messages"])[0]
    assert "1 truncated to fit" in chats.summary() and "too_long 1 (line 2)" in chats.summary()


# ---- train_instruct.py end to end, then sample.py --instruct ------------------------------------

def run(*cmd, input=None, check=True):
    r = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, input=input, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def instruct_flags(tokenizer, sources):
    """tiny preset, 8 sequences of 128 tokens per step: 92% dialogs (targets masked), 8% code."""
    return ["--init", "tiny", "--tokenizer", tokenizer, "--data", *sources, "--seq-len", "128",
            "--batch-tokens", "1024", "--micro-batch", "8", "--lr", "2e-3", "--warmup", "2",
            "--dtype", "fp32", "--ckpt-every", "2", "--eval-every", "2", "--eval-seqs", "4"]


@pytest.fixture(scope="module")
def instruct_run(instruct_flags, tmp_path_factory):
    out = tmp_path_factory.mktemp("instruct")
    first = run("train_instruct.py", *instruct_flags, "--out", out, "--steps", "4")
    second = run("train_instruct.py", *instruct_flags, "--out", out, "--steps", "6")
    return out, first.stdout, second.stdout


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_instruct_run_exports_evaluates_and_resumes(instruct_run):
    out, first, second = instruct_run
    # the two-pair dialogs (136 to 171 tokens) keep their first pair in 128 tokens
    assert "chat.jsonl: 300 records, 300 dialogs kept (llama2 layout), 150 truncated" in first
    args = json.loads((out / "args.json").read_text())
    assert args["mix"] == [0.92, 0.06, 0.02] and args["whole_docs"]  # the recipe's defaults
    assert "resumed from" in second and "step-0000004" in second
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in rows if "eval_loss/chat.jsonl" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all("eval_loss/code" in r for r in evals)  # step 6's value: checked by hand below
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.model").is_file()
    from test_tokenizer import assert_transformers_loads
    assert_transformers_loads(out / "hf")


def test_step_one_loss_and_gradient_norm_match_a_hand_calculation(instruct_flags, instruct_run,
                                                                   tmp_path):
    """Step 1's logged loss and gradient norm, recomputed outside the engine: the starting weights
    exported and run by transformers, the first batch's cross-entropy averaged by hand over the
    targets that count (the answers; never the questions or the padding)."""
    import torch
    import train
    import train_instruct
    transformers = pytest.importorskip("transformers")
    args = train.parser(**train_instruct.DEFAULTS).parse_args(
        map(str, [*instruct_flags, "--out", tmp_path / "out", "--steps", "4"]))
    d = train.Dist(rank=0, world=1, device=torch.device("cpu"), mesh=None)
    tok, tok_path, transform, _ = train.check_setup(args, None, d, ())
    batches = train.setup_data(args, tok, tok_path, transform, d)
    (source, hx, hy), *_ = batches.held_out(args.eval_seqs)
    x, y = (torch.from_numpy(t) for t in batches.next())
    counts = [(y[:4] != IGNORE).sum().item(), (y[4:] != IGNORE).sum().item()]
    # a real mask, and unequal counts in the halves two processes get (the test below)
    assert 0 < sum(counts) < y.numel() // 2 and counts[0] != counts[1], counts
    train.build_model(args, tok, d, resuming=False).save_pretrained(tmp_path / "start")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "start",
                                                       torch_dtype=torch.float32)
    logp = torch.log_softmax(hf(x).logits.double(), dim=-1)
    keep = y != IGNORE
    nll = -logp[keep].gather(1, y[keep].unsqueeze(1))
    loss = nll.sum() / keep.sum()
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hf.parameters()))
    step1 = metrics(instruct_run[0])[0]
    assert step1["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert step1["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)
    # the held-out loss of the chat source after step 6: the exported model, the held-out
    # dialogs' answer tokens only
    assert source == 0
    final = transformers.LlamaForCausalLM.from_pretrained(instruct_run[0] / "hf",
                                                          torch_dtype=torch.float32)
    hx, hy = torch.from_numpy(hx), torch.from_numpy(hy)
    with torch.no_grad():
        logp = torch.log_softmax(final(hx).logits.double(), dim=-1)
    keep = hy != IGNORE
    held_out = -logp[keep].gather(1, hy[keep].unsqueeze(1)).mean()
    assert 0 < keep.sum() < keep.numel()
    assert metrics(instruct_run[0])[5]["eval_loss/chat.jsonl"] == pytest.approx(held_out.item(),
                                                                                rel=1e-5)


def test_two_processes_match_one_with_masked_targets(instruct_flags, instruct_run, tmp_path):
    """Two processes whose halves of the batch hold unequal numbers of targets (checked above)
    log the losses of one process: the loss is a mean over the global batch's targets."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "train_instruct.py", *map(str, instruct_flags),
                        "--out", str(tmp_path), "--steps", "4"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "2 process(es)" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = metrics(instruct_run[0])[:4], metrics(tmp_path)
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)


def test_sample_instruct_one_shot_interactive_and_refusal(instruct_run, capsys, monkeypatch):
    import sample
    flags = ["--ckpt", str(instruct_run[0] / "hf"), "--instruct", "--greedy",
             "--max-new-tokens", "6"]
    sample.main([*flags, "--prompt", "Please add 2 and 3.", "--json"])
    one = json.loads(capsys.readouterr().out)
    # greedy: transformers' generate on the same chat prompt gives the same tokens
    import torch
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_pretrained(instruct_run[0] / "hf")
    prompt = format_chat(tok, [{"role": "user", "content": "Please add 2 and 3."}])
    hf = transformers.LlamaForCausalLM.from_pretrained(instruct_run[0] / "hf",
                                                       torch_dtype=torch.float32)
    ids = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                      eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
    assert one["token_ids"] == ids[:len(one["token_ids"])] and len(one["token_ids"]) >= 1
    assert one["completion"] == tok.decode(one["token_ids"]).strip()  # the answer, stripped
    # interactive: two questions answered, the one holding a reserved tag refused, then EOF
    monkeypatch.setattr(sys, "stdin", io.StringIO("Add 1 and 2.\nnow [INST] this\nAnd 4?\n"))
    sample.main([*flags, "--system", "Be brief."])
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and out.count("refused:") == 1
    with pytest.raises(SystemExit, match="reserved tags"):
        sample.main([*flags, "--prompt", "tell me <<SYS>> x"])


def test_a_chat_file_that_is_not_json_is_a_clear_error(tokenizer, sources, tmp_path):
    import train
    import train_instruct
    bad = write_jsonl(tmp_path / "chat.jsonl", ["", "{broken"])
    args = train.parser(**train_instruct.DEFAULTS).parse_args(map(str, [
        "--init", "tiny", "--tokenizer", tokenizer, "--data", bad, *sources[1:], "--out",
        tmp_path / "out", "--steps", "1", "--seq-len", "128", "--batch-tokens", "1024"]))
    with pytest.raises(SystemExit, match=f"^error: {bad}:2: not a JSON record"):
        train.run(args)
