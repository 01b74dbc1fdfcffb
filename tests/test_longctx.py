"""train_longctx.py and train_python.py (Code Llama sec. 2.4 and 2.6): long-context fine-tuning of a
base-1e4 checkpoint with --base 1e6 changes the rotation tables and the exported config and nothing
else; both recipes carry the paper's values; and the --whole-docs packing only moves documents to
sequence starts (it never drops, repeats or reorders a token) and counts what it packed."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, STDLIB
import train
import train_longctx
import train_python
from data import IGNORE, Batches, Corpus, Tokenizer, prepare
from model import ModelArgs, Transformer, rope_tables


def run(*cmd):
    r = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


# ---- long-context fine-tuning of a base-1e4 checkpoint, end to end ------------------------------

@pytest.fixture(scope="module")
def longctx(tokenizer, tmp_path_factory):
    """train_longctx.py --base 1e6 at 2,048 tokens from a tiny base-1e4 checkpoint, at LR 0: one
    optimizer step that moves no weight, so the export differs from its --init by the base alone.
    The checkpoint also holds a stale `rotary_emb.inv_freq` of base 1e4, as old HF checkpoints do:
    it must not survive."""
    init = tmp_path_factory.mktemp("init")
    tok = Tokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", vocab_size=tok.vocab_size))
    model.init_weights()
    model.save_pretrained(init)
    tok.save(init)
    tensors = load_file(init / "model.safetensors")
    head_dim = model.args.head_dim
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = \
        1e4 ** -(torch.arange(0, head_dim, 2).float() / head_dim)
    save_file(tensors, init / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path_factory.mktemp("longctx")
    run("train_longctx.py", "--init", init, "--data", STDLIB / "email", "--out", out,
        "--steps", "1", "--seq-len", "2048", "--batch-tokens", "2048", "--lr", "0",
        "--warmup", "1", "--eval-every", "0", "--dtype", "fp32")
    return init, out


def test_base_change_touches_the_rotation_and_the_config_only(longctx):
    init, out = longctx
    before = json.loads((init / "config.json").read_text())
    after = json.loads((out / "hf" / "config.json").read_text())
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {"rope_theta", "max_position_embeddings"}
    assert (before["rope_theta"], after["rope_theta"]) == (1e4, 1e6)
    # the tiny preset says 1,024 positions; the model has now trained on 2,048
    assert (before["max_position_embeddings"], after["max_position_embeddings"]) == (1024, 2048)
    old, new = load_file(init / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert set(old) - set(new) == {"model.layers.0.self_attn.rotary_emb.inv_freq"}
    for k, v in new.items():
        assert torch.equal(v, old[k]), k
    args = json.loads((out / "args.json").read_text())
    assert args["activation_checkpointing"] and args["whole_docs"]  # the stage's defaults
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["seqs_one_doc"] + row["seqs_many_docs"] == 1


def test_base_change_keeps_short_range_logits_and_moves_long_range_ones(longctx):
    transformers = pytest.importorskip("transformers")
    init, out = longctx
    old, new = Transformer.from_pretrained(init), Transformer.from_pretrained(out / "hf")
    # the tables come from the config's base, computed on use: the old base left no trace
    cos, _ = new.rope(512, torch.device("cpu"))
    torch.testing.assert_close(cos[:512], rope_tables(new.args.head_dim, 512, 1e6)[0])
    tokens = torch.randint(0, new.args.vocab_size, (1, 512), generator=torch.Generator()
                           .manual_seed(0))
    with torch.no_grad():
        a, b = old(tokens)[0], new(tokens)[0]
        # transformers on the export (rope_theta 1e6 in its config.json, the same weights: the
        # run trained at LR 0) is the reference for the new base
        ref = transformers.LlamaForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
        ref = ref.eval()(tokens).logits[0]
    torch.testing.assert_close(b, ref, rtol=0, atol=1e-4)
    from test_tokenizer import assert_transformers_loads
    assert_transformers_loads(out / "hf")
    diff = (a - b).abs().amax(-1)  # (T,)
    assert diff[0] < 1e-5  # position 0 attends to itself only: no rotation matters
    # The two bases' angles differ by distance x (1e4^(-2i/d) - 1e6^(-2i/d)): little one or two
    # tokens apart, a lot at tens of tokens and more (measured ratio 0.09-0.15 over 8 inputs)
    assert diff[1:3].max() < 0.3 * diff[64:].max()


def test_python_and_longctx_defaults_are_the_papers():
    args = train.parser(**train_python.DEFAULTS).parse_args(["--init", "i", "--data", "d", "--out",
                                                             "o"])
    assert args.mix == [0.75, 0.10, 0.10, 0.05]  # Table 1: Python, code, NL about code, NL
    assert (args.lr, args.seq_len, args.batch_tokens) == (1e-4, 4096, 2**22)  # sec. 2.6
    assert not args.whole_docs and not args.activation_checkpointing  # the engine's defaults
    p = train.parser(**train_longctx.DEFAULTS)
    args = p.parse_args(["--init", "codellama-7b", "--data", "d", "--out", "o"])
    assert (args.seq_len, args.lr, args.steps, args.base) == (16384, 2e-5, 10_000, 1e6)
    assert args.activation_checkpointing and args.whole_docs
    assert train_longctx.batch_tokens(args) == 2**21  # 2M tokens: 128 sequences of 16k
    args = p.parse_args(["--init", "codellama-34b", "--data", "d", "--out", "o",
                         "--no-activation-checkpointing", "--no-whole-docs"])
    assert train_longctx.batch_tokens(args) == 2**20  # 1M for 34B
    assert not args.activation_checkpointing and not args.whole_docs


# ---- linear position interpolation (Chen et al. 2023), Table 18's ablation -----------------------

def small_model(scale, theta=1e4):
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=301,
                              multiple_of=16, rope_theta=theta, rope_scale=scale, max_seq_len=64))
    m.init_weights(std=0.1)  # attention far from uniform, so positions show in the logits
    return m.eval()


def test_linear_scaling_divides_positions_in_fp32_tables():
    cos1, sin1 = rope_tables(32, 400, 1250.0)
    cos4, sin4 = rope_tables(32, 1600, 1250.0, scale=4.0)
    assert cos4.dtype == torch.float32
    # position 4p with factor 4 turns exactly as position p without it
    torch.testing.assert_close(cos4[::4], cos1, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin4[::4], sin1, rtol=0, atol=1e-6)
    assert not torch.allclose(cos4[:400], cos1, atol=1e-3)
    # the model's tables follow the field, like the base; nothing of them is a weight
    m = small_model(4.0)
    cos, _ = m.rope(100, torch.device("cpu"))
    torch.testing.assert_close(cos[:100], rope_tables(16, 100, 1e4, scale=4.0)[0])
    m.args.rope_scale = 1.0
    torch.testing.assert_close(m.rope(100, torch.device("cpu"))[0][:100],
                               rope_tables(16, 100, 1e4)[0])
    assert not any("rope" in k or "freq" in k for k in m.state_dict())


def test_linear_scaling_config_round_trip_and_transformers_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = small_model(4.0)
    m.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert cfg["rope_theta"] == 1e4
    tokens = torch.randint(0, 301, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = m(tokens)
        again = Transformer.from_pretrained(tmp_path / "a")
        assert again.args.rope_scale == 4.0
        assert torch.equal(again(tokens), ours)
        ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
        assert (ref(tokens).logits - ours).abs().max().item() <= 1e-4
        # transformers' own save (its rope_parameters form) loads back to the same model
        ref.save_pretrained(tmp_path / "b")
        back = Transformer.from_pretrained(tmp_path / "b")
        assert (back.args.rope_theta, back.args.rope_scale) == (1e4, 4.0)
        assert (back(tokens) - ours).abs().max().item() <= 1e-5
        # the factor matters: unscaled, the same weights give other logits past position 0
        plain = small_model(1.0)(tokens)
        assert torch.allclose(plain[:, 0], ours[:, 0], atol=1e-5)
        assert (plain[:, 1:] - ours[:, 1:]).abs().max() > 1e-2
    unscaled = small_model(1.0)
    unscaled.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["rope_scaling"] is None


def test_other_rope_scalings_are_refused(tmp_path):
    small_model(1.0).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for scaling, message in (({"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
                             ({"rope_type": "linear", "factor": 0}, "must be positive")):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_scaling": scaling}))
        with pytest.raises(ValueError, match=message):
            Transformer.from_pretrained(tmp_path)


def test_rope_scale_flag_is_off_by_default_and_reaches_the_export(longctx, tmp_path):
    """train_longctx.py --rope-scale 4 (base kept) at LR 0: the export differs from its --init by
    rope_scaling and max_position_embeddings alone, and runs with positions divided by 4."""
    init, _ = longctx
    p = train.parser(**train_longctx.DEFAULTS)
    args = p.parse_args(["--init", str(init), "--data", "d", "--out", "o"])
    assert args.rope_scale == 1.0 and train.model_args(args).rope_scale == 1.0
    args = p.parse_args(["--init", str(init), "--data", "d", "--out", "o", "--rope-scale", "4"])
    assert train.model_args(args).rope_scale == 4.0
    out = tmp_path / "linear"
    run("train_longctx.py", "--init", init, "--data", STDLIB / "email", "--out", out,
        "--steps", "1", "--seq-len", "2048", "--batch-tokens", "2048", "--lr", "0",
        "--warmup", "1", "--eval-every", "0", "--dtype", "fp32", "--base", "1e4",
        "--rope-scale", "4")
    before = json.loads((init / "config.json").read_text())
    after = json.loads((out / "hf" / "config.json").read_text())
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {"rope_scaling", "max_position_embeddings"}
    assert after["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    tokens = torch.randint(0, 1024, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scaled = Transformer.from_pretrained(out / "hf")
        ref = Transformer.from_pretrained(init)
        ref.args.rope_scale = 4.0
        torch.testing.assert_close(scaled(tokens), ref(tokens), rtol=0, atol=0)
    r = subprocess.run([sys.executable, "train_longctx.py", "--init", init, "--data", "d",
                        "--out", tmp_path / "bad", "--rope-scale", "0", "--steps", "1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode and "--rope-scale must be positive" in r.stderr


# ---- --whole-docs packing ----------------------------------------------------------------------

L = 64  # tokens per sequence


@pytest.fixture(scope="module")
def corpus(tokenizer, tmp_path_factory):
    """60 files of 1 to 11 lines (about 10 to 100 tokens): some fit in a sequence, some don't."""
    src = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    for i in range(60):
        (src / f"f{i:02d}.py").write_text("".join(f"v{i}_{j} = {j}\n"
                                                  for j in range(rng.integers(1, 12))))
    out = tmp_path_factory.mktemp("prepared") / "docs"
    prepare([src], tokenizer, out, progress=False)
    return Corpus(out), Tokenizer.from_pretrained(tokenizer)


def stream(corpus, whole, steps, rows=3):
    """Each row's real input ids over `steps` steps, back to back, where each row started, and the
    per-step (one-document, several-document, padding) counts."""
    c, tok = corpus
    b = Batches([c], [1.0], L, rows, seed=0, tok=tok, whole_docs=whole, eval_docs=0)
    ids, starts, counts = [[] for _ in range(rows)], [[] for _ in range(rows)], []
    for _ in range(steps):
        x, y = b.next()
        counts.append(tuple(b.packing))
        for g in range(rows):
            ignored = np.flatnonzero(y[g] == IGNORE)
            # padding is a suffix; the last real id's target (the padding) is ignored too
            real = x[g] if not len(ignored) else x[g][:ignored[0] + 1]
            if len(real) < L:
                assert (x[g][len(real):] == tok.eos_id).all() and (y[g][len(real) - 1:] ==
                                                                   IGNORE).all()
            starts[g].append(sum(map(len, ids[g])))
            ids[g].append(real)
    return [np.concatenate(i) for i in ids], starts, counts


def documents(ids, bos):
    """[start, end) of each whole document in a stream of BOS ... EOS documents."""
    at = np.flatnonzero(ids == bos)
    return list(zip(at[:-1], at[1:]))


def test_whole_docs_only_moves_documents_to_sequence_starts(corpus):
    bos = corpus[1].bos_id
    plain, plain_starts, plain_counts = stream(corpus, False, 30)
    whole, starts, counts = stream(corpus, True, 30)
    for g in range(3):
        n = min(len(plain[g]), len(whole[g]))
        assert np.array_equal(plain[g][:n], whole[g][:n])  # the same tokens in the same order
        cut = lambda docs, st: [(a, b) for a, b in docs if b - a <= L and  # noqa: E731
                                any(a < s < b for s in st)]
        assert not cut(documents(whole[g], bos), starts[g])  # every doc that fits is whole
        assert cut(documents(plain[g], bos), plain_starts[g])  # without the flag, some are not
    assert all(p == 0 for _, _, p in plain_counts) and sum(p for _, _, p in counts) > 0


def test_loader_counts_one_document_and_several_document_sequences(corpus):
    bos = corpus[1].bos_id
    for whole in (False, True):
        ids, starts, counts = stream(corpus, whole, 20)
        expect = np.zeros((20, 3), int)
        for g in range(3):
            bounds = set(np.flatnonzero(ids[g] == bos).tolist())
            ends = starts[g][1:] + [len(ids[g])]
            for k, (a, b) in enumerate(zip(starts[g], ends)):
                n_docs = 1 + sum(1 for i in range(a + 1, b) if i in bounds)
                expect[k, 0 if n_docs == 1 else 1] += 1
                expect[k, 2] += L - (b - a)
        assert [tuple(r) for r in expect] == counts
        assert expect[:, 0].sum() > 0 and expect[:, 1].sum() > 0


def test_whole_docs_stream_resumes_exactly(corpus):
    c, tok = corpus
    a = Batches([c], [1.0], L, 3, seed=1, tok=tok, whole_docs=True, eval_docs=0)
    for _ in range(4):
        a.next()
    b = Batches([c], [1.0], L, 3, seed=1, tok=tok, whole_docs=True, eval_docs=0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(4):
        for u, v in zip(a.next(), b.next()):
            assert np.array_equal(u, v)
