"""model.py against transformers' LlamaForCausalLM (the numerical reference), plus the properties
the stages rely on: cached decoding, relative-position RoPE, checkpoint round trips and clear load
errors."""

import json

import pytest
import torch

from model import ModelArgs, Transformer, apply_rope, linear_cross_entropy, rope_tables

transformers = pytest.importorskip("transformers")

CONFIGS = {  # name: (n_heads, n_kv_heads, rope_theta, tied)
    "mha-1e4-untied": (4, 4, 1e4, False),
    "gqa-1e6-untied": (8, 2, 1e6, False),
    "mqa-1e4-tied": (4, 1, 1e4, True),
    "gqa-1e6-tied": (4, 2, 1e6, True),
}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_model(n_heads, n_kv_heads, theta, tied, vocab=301, seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
                     multiple_of=16, rope_theta=theta, tie_embeddings=tied, max_seq_len=128)
    m = Transformer(args)
    m.init_weights(std=0.1)  # larger than training's 0.02: attention far from uniform
    with torch.no_grad():  # norms away from 1 so a wrongly applied norm weight shows
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(tmp_path, name):
    m = random_model(*CONFIGS[name])
    m.save_pretrained(tmp_path / "ckpt")
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt",
                                                        torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, m.args.vocab_size, (2, 48), generator=gen(1))
    with torch.no_grad():
        ours = m(tokens)
        theirs = ref(tokens).logits
    assert ours.dtype == torch.float32 and ours.shape == (2, 48, m.args.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # and back: our loader reads the folder to the same logits
    again = Transformer.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(again(tokens), ours)


@pytest.mark.parametrize("name", ["mha-1e4-untied", "gqa-1e6-untied", "mqa-1e4-tied"])
def test_kv_cache_decoding_matches_full_forward(name):
    m = random_model(*CONFIGS[name]).eval()
    tokens = torch.randint(0, m.args.vocab_size, (3, 40), generator=gen(2))
    with torch.no_grad():
        full = m(tokens)
        cache = m.new_cache(3, 64)
        parts = [m(tokens[:, :17], cache=cache, start_pos=0)]  # prefill
        parts.append(m(tokens[:, 17:25], cache=cache, start_pos=17))  # a chunk after a prefix
        for t in range(25, 40):  # one token at a time
            parts.append(m(tokens[:, t:t + 1], cache=cache, start_pos=t))
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5
    with torch.no_grad():
        last = m(tokens, last_only=True)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
    # the compiled decoder's form: the position in a tensor, the whole static cache read through a
    # mask (positions not written yet hold zeros and must not count)
    with torch.no_grad():
        cache = m.new_cache(3, 64)
        parts = [m(tokens[:, :25], cache=cache, start_pos=0)]
        for t in range(25, 40):
            parts.append(m(tokens[:, t:t + 1], cache=cache, start_pos=torch.tensor([t])))
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["mha-1e4-untied", "gqa-1e6-untied"])
def test_left_padded_rows_decode_as_each_row_alone(name):
    """Prompts of different lengths decoded together (forward's `pad`: left padding, positions
    from each row's first real token, padding never attended to): the prefill and every cached
    step give each row the logits of that row run alone; the padding is any id; greedy
    sample.generate of the batch equals one prompt at a time."""
    import sample
    m = random_model(*CONFIGS[name]).eval()
    lengths = [9, 3, 14, 1]
    rows = [torch.randint(0, m.args.vocab_size, (n + 6,), generator=gen(7 + n)) for n in lengths]
    width = max(lengths)
    pad = torch.tensor([width - n for n in lengths])
    tokens = torch.stack([torch.cat([torch.full((width - n,), 7 * n), r[:n]])
                          for n, r in zip(lengths, rows)])
    with torch.no_grad():
        cache = m.new_cache(len(rows), width + 6)
        got = [m(tokens, cache=cache, start_pos=0, pad=pad)[:, -1]]
        for j in range(6):  # then each row's own next tokens, one at a time
            step = torch.stack([r[n + j] for n, r in zip(lengths, rows)])[:, None]
            got.append(m(step, cache=cache, start_pos=width + j, pad=pad)[:, -1])
        for b, (n, r) in enumerate(zip(lengths, rows)):
            alone = m(r[None])[0, n - 1:]
            assert (torch.stack([g[b] for g in got]) - alone).abs().max().item() < 1e-5, b
    prompts = [r[:n].tolist() for n, r in zip(lengths, rows)]
    assert sample.generate(m, prompts, 8) == [sample.generate(m, p, 8)[0] for p in prompts]
    with pytest.raises(ValueError, match="one continuation each"):
        sample.generate(m, prompts, 8, n=2)


def test_eager_cached_generation_equals_full_forward_passes(monkeypatch):
    """sample.generate's eager loop (a prefill, then one token at a time over the KV cache) gives,
    at every step, the logits of a full forward pass over the whole sequence without a cache, and
    so the same greedy tokens; the prompt is longer than one step so that the prefill counts."""
    import sample

    m = random_model(*CONFIGS["gqa-1e6-untied"]).eval()
    seen = []
    real = sample.sample_next
    monkeypatch.setattr(sample, "sample_next",
                        lambda logits, *a: seen.append(logits.clone()) or real(logits, *a))
    prompt = torch.randint(0, m.args.vocab_size, (11,), generator=gen(6)).tolist()
    out = sample.generate(m, prompt, 20, n=2)
    assert out[0] == out[1] and len(out[0]) == 20 and len(seen) == 20
    seq = list(prompt)
    with torch.no_grad():
        for step, logits in enumerate(seen):
            full = m(torch.tensor([seq]))[0, -1]
            assert (logits - full).abs().max().item() < 1e-5, step
            seq.append(int(full.argmax()))
    assert seq[len(prompt):] == out[0]


def test_sampling_temperature_and_nucleus():
    """sample_next: greedy at temperature 0; softmax(logits / T) otherwise; top-p keeps the
    smallest set of likeliest tokens whose mass reaches p (here 0.5 + 0.3 >= 0.7: two of four)."""
    from sample import sample_next
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20_000, -1)
    assert sample_next(logits[:3], 0.0, 0.7).tolist() == [0, 0, 0]

    def freq(temperature, top_p):
        ids = sample_next(logits, temperature, top_p, gen(7))
        return torch.bincount(ids, minlength=4).float() / len(ids)

    assert torch.allclose(freq(1.0, 1.0), probs, atol=0.015)
    hot = probs.sqrt() / probs.sqrt().sum()  # temperature 2: p^(1/2), renormalized
    assert torch.allclose(freq(2.0, 1.0), hot, atol=0.015)
    nucleus = freq(1.0, 0.7)
    assert nucleus[2:].sum() == 0
    assert torch.allclose(nucleus[:2], torch.tensor([0.625, 0.375]), atol=0.015)


def test_compiled_generation_matches_eager_and_compiles_once():
    """generate(compile=True) writes the same tokens as the eager loop; a second prompt of another
    length reuses the first compilation (no recompile); batched sampling does too."""
    from sample import generate

    m = random_model(*CONFIGS["gqa-1e6-untied"]).eval()
    torch._dynamo.reset()
    a, b = [5, 6, 7, 8, 9], list(range(20, 43))
    eager = generate(m, a, 12)
    assert generate(m, a, 12, compile=True) == eager
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert generate(m, b, 20, compile=True) == generate(m, b, 20)
    sampled = dict(temperature=1.0, n=3)  # batch 1 is specialized: a second graph for n > 1
    assert (generate(m, b, 9, generator=gen(4), compile=True, **sampled)
            == generate(m, b, 9, generator=gen(4), **sampled))
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert (generate(m, a, 7, generator=gen(5), compile=True, **{**sampled, "n": 2})
                == generate(m, a, 7, generator=gen(5), **{**sampled, "n": 2}))


def test_a_model_that_sampled_can_still_train():
    """generate runs under inference_mode; the rope tables it builds must still serve autograd."""
    from sample import generate

    m = random_model(*CONFIGS["gqa-1e6-untied"])
    generate(m, [1, 2, 3], 4)
    tokens = torch.randint(0, m.args.vocab_size, (2, 16), generator=gen(3))
    m(tokens).sum().backward()  # inference tensors saved for backward would raise here
    assert m.layers[0].attention.wq.weight.grad is not None


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_matches_the_logits_path(autocast):
    """model.linear_cross_entropy, chunk by chunk, against the full (N, V) logits and
    F.cross_entropy (sum, ignore_index -100) under the same autocast: the loss and the gradients
    of the hidden states and of the weight. Chunks of 7 rows over 40 (the last one short), ignored
    targets inside a chunk and a chunk of ignored targets only; without gradients (evaluation)
    the same loss. In fp32 they agree to float rounding, under bf16 autocast to bf16 rounding of
    the logits' gradient (the fused path sums the weight's gradient over chunks in fp32)."""
    g = gen(0)
    h = torch.randn(40, 32, generator=g).requires_grad_()
    w = (0.3 * torch.randn(301, 32, generator=g)).requires_grad_()
    y = torch.randint(0, 301, (40,), generator=g)
    y[[3, 5, 17]] = -100
    y[28:35] = -100  # the 5th chunk, rows 28-34, has no target
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    results = []
    for fused in (False, True):
        h.grad = w.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            if fused:
                loss = linear_cross_entropy(h, w, y, chunk_rows=7)
            else:
                loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(),
                                                         y, reduction="sum")
        (0.37 * loss).backward()  # a scale, as the engine's 1 / targets
        results.append((loss.detach(), h.grad, w.grad))
    (loss, dh, dw), (fused_loss, fused_dh, fused_dw) = results
    torch.testing.assert_close(fused_loss, loss, rtol=1e-3 if autocast else 1e-6, atol=0)
    torch.testing.assert_close(fused_dh, dh, **tol)
    torch.testing.assert_close(fused_dw, dw, **tol)
    assert fused_dh[y == -100].abs().max() == 0  # no gradient from an ignored target
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        assert linear_cross_entropy(h, w, y, chunk_rows=7) == fused_loss


def test_rope_depends_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    cos, sin = rope_tables(64, 20000, 1e6)

    def score(i, j):
        return (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1],
                                                                      sin[j:j + 1])).sum()

    assert torch.allclose(score(5, 2), score(15005, 15002), atol=1e-3)
    assert torch.allclose(score(100, 0), score(130, 30), atol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_rope_theta_override_rebuilds_tables_and_is_never_saved(tmp_path):
    m = random_model(4, 2, 1e4, False)
    assert not any("rope" in k or "freq" in k for k in m.state_dict())
    m.save_pretrained(tmp_path / "a")
    m2 = Transformer.from_pretrained(tmp_path / "a", rope_theta=1e6)
    assert m2.args.rope_theta == 1e6
    tokens = torch.randint(0, 301, (1, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = m(tokens), m2(tokens)
    # position 0 is unrotated whatever the base; far positions differ
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-5)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3
    m2.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["rope_theta"] == 1e6
    # the table follows the field, even on a live model
    m.args.rope_theta = 1e6
    with torch.no_grad():
        assert torch.allclose(m(tokens), b, atol=1e-6)


def test_presets_have_the_paper_dimensions():
    cl34 = ModelArgs.from_name("codellama-34b")
    assert (cl34.hidden_dim, cl34.kv_heads, cl34.head_dim, cl34.rope_theta) == (22016, 8, 128, 1e6)
    assert ModelArgs.from_name("llama2-7b").hidden_dim == 11008
    assert ModelArgs.from_name("codellama-13b").hidden_dim == 13824
    assert ModelArgs.from_name("llama2-70b").hidden_dim == 28672
    assert abs(ModelArgs.from_name("llama2-7b").num_params() - 6.74e9) < 0.01e9
    assert ModelArgs.from_name("codellama-7b").vocab_size == 32016
    with pytest.raises(ValueError, match="unknown preset"):
        ModelArgs.from_name("llama2-8b")


def test_resize_vocab_initializes_new_rows_to_the_mean():
    m = random_model(4, 2, 1e4, False)
    old_out = m.output.weight.detach().clone()
    m.resize_vocab(304)
    assert m.tok_embeddings.weight.shape == (304, 64) and m.output.weight.shape == (304, 64)
    assert torch.allclose(m.output.weight[-1], old_out.mean(0))
    assert torch.equal(m.output.weight[:301], old_out)
    tied = random_model(4, 2, 1e4, True)
    tied.resize_vocab(320)
    assert tied.output.weight is tied.tok_embeddings.weight


def test_sharded_save_loads_in_transformers(tmp_path):
    m = random_model(4, 2, 1e6, False)
    m.save_pretrained(tmp_path / "s", shard_bytes=100_000)
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "s", torch_dtype=torch.float32)
    again = Transformer.from_pretrained(tmp_path / "s")
    tokens = torch.arange(30)[None]
    with torch.no_grad():
        assert (ref(tokens).logits - m(tokens)).abs().max() < 1e-4
        assert torch.equal(again(tokens), m(tokens))


def test_rope_parameters_config_form(tmp_path):
    m = random_model(4, 2, 1e6, False)
    m.save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    assert Transformer.from_pretrained(tmp_path / "c").args.rope_theta == 1e6


def test_meta_layout_with_model_parallel_shards(tmp_path):
    """Write a model in Meta's layout (interleaved q/k rows, 2 model-parallel shards) and load
    it."""
    m = random_model(8, 2, 1e6, False)
    a = m.args
    hd = a.head_dim

    def to_meta_qk(w, n):  # half-split -> interleaved, the inverse of the loader's permutation
        return w.view(n, 2, hd // 2, a.dim).transpose(1, 2).reshape(n * hd, a.dim)

    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    for k in sd:
        if k.endswith("wq.weight"):
            sd[k] = to_meta_qk(sd[k], a.n_heads)
        elif k.endswith("wk.weight"):
            sd[k] = to_meta_qk(sd[k], a.kv_heads)
    shards = [{}, {}]
    for k, v in sd.items():
        if k.endswith("norm.weight"):
            parts = [v, v]
        elif k.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")):
            parts = v.chunk(2, dim=1)
        elif k.endswith(("wq.weight", "wk.weight")):  # split by heads, as model parallelism does
            parts = v.chunk(2, dim=0)
        else:
            parts = v.chunk(2, dim=0)
        for s, p in zip(shards, parts):
            s[k] = p.clone()
    d = tmp_path / "meta"
    d.mkdir()
    for i, s in enumerate(shards):
        torch.save(s, d / f"consolidated.{i:02d}.pth")
    (d / "params.json").write_text(json.dumps(dict(
        dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
        multiple_of=a.multiple_of, norm_eps=a.norm_eps, rope_theta=a.rope_theta, vocab_size=-1)))
    loaded = Transformer.from_pretrained(d, dtype=torch.float32)
    tokens = torch.arange(50)[None] % 301
    with torch.no_grad():
        assert (loaded(tokens) - m(tokens)).abs().max() < 1e-5


def test_bad_checkpoints_name_the_file_and_tensor(tmp_path):
    m = random_model(4, 2, 1e4, False)
    good = tmp_path / "good"
    m.save_pretrained(good)
    st = good / "model.safetensors"

    def clone(name):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((good / "config.json").read_text())
        return d

    truncated = clone("truncated")
    (truncated / "model.safetensors").write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(tensor|safetensors)"):
        Transformer.from_pretrained(truncated)

    from safetensors.torch import load_file, save_file
    sd = load_file(st)
    missing = clone("missing")
    save_file({k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k},
              missing / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing.*layers\.1\.feed_forward\.w3"):
        Transformer.from_pretrained(missing)

    shape = clone("shape")
    sd2 = dict(sd)
    sd2["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(sd2, shape / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*layers\.0\.attention\.wk.*shape"):
        Transformer.from_pretrained(shape)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(empty)


def test_every_bad_checkpoint_folder_is_one_line(tmp_path, tokenizer):
    """What sample.py, eval.py and self_instruct.py load (sample.load), and what train.py's --init
    loads: each bad folder stops with one line naming the file and the problem."""
    import subprocess
    import sys
    from pathlib import Path

    import train
    from sample import load
    from tokenizer import Tokenizer

    good = tmp_path / "good"
    random_model(4, 2, 1e4, False, vocab=1024).save_pretrained(good)
    Tokenizer.from_pretrained(tokenizer).save(good)
    st = (good / "model.safetensors").read_bytes()
    config = json.loads((good / "config.json").read_text())

    def folder(name, **files):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        for f, content in files.items():
            f = f.replace("_", ".", 1) if f != "tokenizer_model" else "tokenizer.model"
            if content is None:
                (d / f).unlink()
            else:
                (d / f).write_bytes(content if isinstance(content, bytes) else content.encode())
        return d

    small = tmp_path / "small"  # a model of 512 embeddings beside a 1,024-piece tokenizer
    random_model(4, 2, 1e4, False, vocab=512).save_pretrained(small)
    Tokenizer.from_pretrained(tokenizer).save(small)
    cases = {  # folder: (the file named, the problem)
        folder("truncated", model_safetensors=st[:len(st) // 2]):
            ("model.safetensors", "cannot read"),
        folder("garbage", model_safetensors=b"\x00\x01" * 100 + st[200:]):
            ("model.safetensors", "cannot read"),
        folder("notjson", config_json="{\"hidden_size\": 64,"): ("config.json", "not valid JSON"),
        folder("nokey", config_json=json.dumps({**config, "num_hidden_layers": None})):
            ("config.json", "num_hidden_layers is None"),
        folder("badvalue", config_json=json.dumps({**config, "hidden_size": "64"})):
            ("config.json", "hidden_size is '64', not a positive integer"),
        folder("notdict", config_json="[1, 2]"): ("config.json", "not a JSON object"),
        folder("vocab", config_json=json.dumps({**config, "vocab_size": 2048})):
            ("model.safetensors", "has shape (1024, 64), the model (2048, 64)"),
        folder("notokenizer", tokenizer_model=None): ("notokenizer", "no tokenizer.model"),
        small: ("small", "the tokenizer has 1024 tokens but the model only 512"),
    }
    for d, (file, problem) in cases.items():
        with pytest.raises(SystemExit) as e:
            load(d)
        message = str(e.value)
        assert message.startswith("error: ") and "\n" not in message, message
        assert str(d / file) in message or (file == d.name and str(d) in message), message
        assert problem in message, message
    # train.py --init: the same files, one line (data and tokenizer are fine)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def f(x):\n    return x + 1\n" * 50)
    for name in ("truncated", "notjson", "vocab"):
        args = train.parser().parse_args(map(str, [
            "--init", tmp_path / name, "--tokenizer", tokenizer, "--data", src, "--out",
            tmp_path / f"out-{name}", "--steps", "1", "--seq-len", "32", "--batch-tokens", "64",
            "--lr", "1e-3", "--dtype", "fp32"]))
        with pytest.raises(SystemExit, match=r"^error: " + str(tmp_path / name)) as e:
            train.run(args)
        assert "\n" not in str(e.value)
    # the command line: no traceback
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "truncated"),
                        "--prompt", "x"], cwd=Path(__file__).parents[1], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'truncated'}")


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                        (0o077, 0o600, 0o700)])
def test_written_files_get_the_modes_the_umask_gives(tmp_path, umask, file_mode, dir_mode):
    """The atomic writes (common.write_atomic: text, bytes, a writer function) and an exported
    checkpoint folder (save_pretrained; safetensors alone would make its files 0600) get the modes
    open() and mkdir() would: readable by others under umask 022, private under 077."""
    import os

    from common import write_atomic
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "a.txt", "text")
        write_atomic(tmp_path / "b.bin", b"bytes")
        write_atomic(tmp_path / "c.txt", lambda p: p.write_text("written by a function"))
        random_model(4, 2, 1e4, False).save_pretrained(tmp_path / "hf", shard_bytes=40_000)
    finally:
        os.umask(old)
    files = [tmp_path / n for n in ("a.txt", "b.bin", "c.txt")] + list((tmp_path / "hf").iterdir())
    assert len(files) > 6 and (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: file_mode for f in files}
    assert (tmp_path / "hf").stat().st_mode & 0o777 == dir_mode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries
