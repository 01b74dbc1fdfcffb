"""End-to-end truth on a real pretrained model: SmolLM2-135M-Instruct (converted from its GGUF by
the `smollm2_dir` fixture) through model.py and sample.py, against transformers on the same
folder."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from model import Transformer
from prompts import format_dialog
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(smollm2_dir):
    ours = Transformer.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return ours, theirs


def chat_prompt(folder, text):
    tok = Tokenizer.from_pretrained(folder)
    return tok, format_dialog(tok, [{"role": "user", "content": text}])


def test_logits_match_transformers(models, smollm2_dir):
    ours, theirs = models
    assert ours.args.tie_embeddings and ours.args.kv_heads == 3 and ours.args.n_layers == 30
    _, ids = chat_prompt(smollm2_dir, "Write a Python function that adds two numbers.")
    tokens = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff <= 1e-4


def test_greedy_generation_through_sample_py_equals_transformers(models, smollm2_dir):
    _, theirs = models
    # sample.py encodes --prompt as plain text, so compare on a plain code prompt, where both sides
    # see exactly the same ids
    tok = Tokenizer.from_pretrained(smollm2_dir)
    code = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    out = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(smollm2_dir), "--prompt", code,
         "--greedy", "--max-new-tokens", "64", "--json", "--dtype", "float32"],
        capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    prompt_ids = tok.encode(code, bos=tok.add_bos)
    with torch.no_grad():
        ref = theirs.generate(torch.tensor([prompt_ids]), max_new_tokens=64, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                              eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    ref_ids = ref[0, len(prompt_ids):].tolist()
    if ref_ids and ref_ids[-1] == tok.eos_id:
        ref_ids = ref_ids[:-1]  # sample.py stops at EOS without emitting it
    assert result["token_ids"] == ref_ids
    assert len(ref_ids) >= 32  # a real continuation, not an immediate stop
    assert result["completion"] == tok.decode(ref_ids)
    assert result["tokens_per_s"] > 0


def test_batched_generation_with_cache_matches_one_row(models, smollm2_dir):
    from sample import generate

    ours, _ = models
    _, ids = chat_prompt(smollm2_dir, "Name three prime numbers.")
    one = generate(ours, ids, 12, temperature=0.0)[0]
    many = generate(ours, ids, 12, temperature=0.0, n=3)
    assert all(row == one for row in many)
    g = torch.Generator().manual_seed(0)
    sampled = generate(ours, ids, 12, temperature=1.0, top_p=0.95, n=3, generator=g)
    assert len({tuple(r) for r in sampled}) > 1  # rows draw independently


def test_save_pretrained_round_trip_in_transformers(models, tmp_path):
    ours, _ = models
    ours.save_pretrained(tmp_path / "out")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out",
                                                             dtype=torch.float32).eval()
    tokens = torch.arange(100, 164)[None]
    with torch.no_grad():
        assert (reloaded(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4


LAYERS, HIDDEN = 4, 1024  # the Meta-layout test's cut of SmolLM2 (see below)


def meta_folder_from_gguf():
    """Meta's layout (consolidated.00.pth + params.json) built from an independent source: the
    GGUF file, whose q/k rows are in Meta's interleaved order, as llama.cpp's converter writes
    them. The first LAYERS blocks, the FFN cut to its first HIDDEN units (so that params.json's
    ffn_dim_multiplier decides the width), and a stray `rope.freqs` of the wrong base (Meta's 7B
    files hold one). Reading the GGUF takes ~20 s: the folder is cached beside the converted one
    (the key covers the GGUF file and this function)."""
    import hashlib
    import inspect
    import os

    import gguf_to_hf
    src = gguf_to_hf.default_gguf_path()
    source = inspect.getsource(meta_folder_from_gguf)
    key = hashlib.sha256(f"{src.name}:{src.stat().st_size}:{source}".encode()).hexdigest()[:12]
    folder = gguf_to_hf.CACHE / f"smollm2-meta-layout-{key}"
    if folder.is_dir():
        return folder
    from gguf import GGUFReader
    from gguf.quants import dequantize
    reader = GGUFReader(src)
    names = {"attn_norm": "attention_norm", "ffn_norm": "ffn_norm", "attn_q": "attention.wq",
             "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
             "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
             "ffn_up": "feed_forward.w3"}
    meta = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= LAYERS:
            continue
        w = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        w = torch.from_numpy(w.astype("float32"))
        if t.name in ("token_embd.weight", "output_norm.weight"):
            name = {"token_embd.weight": "tok_embeddings.weight",
                    "output_norm.weight": "norm.weight"}[t.name]
        else:
            _, i, part, _ = t.name.split(".")
            name = f"layers.{i}.{names[part]}.weight"
            if part in ("ffn_gate", "ffn_up"):  # SwiGLU's first HIDDEN units: a smaller FFN
                w = w[:HIDDEN]
            elif part == "ffn_down":
                w = w[:, :HIDDEN]
        meta[name] = w.clone()
    meta["output.weight"] = meta["tok_embeddings.weight"].clone()  # Meta's files never tie
    meta["rope.freqs"] = 1e4 ** -(torch.arange(0, 64, 2).float() / 64)
    field = lambda k: gguf_to_hf.field(reader, f"llama.{k}")  # noqa: E731
    # int(2 * 4 * 576 / 3) = 1,536, times 0.6 = 921, rounded up to a multiple of 256 = 1,024
    params = {"dim": int(field("embedding_length")), "n_layers": LAYERS,
              "n_heads": int(field("attention.head_count")),
              "n_kv_heads": int(field("attention.head_count_kv")), "vocab_size": -1,
              "multiple_of": 256, "ffn_dim_multiplier": 0.6,
              "norm_eps": gguf_to_hf.f32(field("attention.layer_norm_rms_epsilon")),
              "rope_theta": gguf_to_hf.f32(field("rope.freq_base"))}
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    torch.save(meta, tmp / "consolidated.00.pth")
    (tmp / "params.json").write_text(json.dumps(params))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first
        import shutil
        shutil.rmtree(tmp)
    return folder


def test_meta_layout_from_the_gguf_matches_transformers(smollm2_dir, tmp_path):
    """Our logits from the GGUF-built Meta folder equal transformers' on an HF folder of the same
    weights (the converted SmolLM2, q/k in HF's order, cut the same way)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    folder = meta_folder_from_gguf()
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    hf = tmp_path / "hf"
    hf.mkdir()
    tensors = {}
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as f:
        for k in f.keys():
            if k.startswith("model.layers.") and int(k.split(".")[2]) >= LAYERS:
                continue
            v = f.get_tensor(k)
            if k.endswith(("gate_proj.weight", "up_proj.weight")):
                v = v[:HIDDEN]
            elif k.endswith("down_proj.weight"):
                v = v[:, :HIDDEN]
            tensors[k] = v.contiguous()
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(
        {**cfg, "num_hidden_layers": LAYERS, "intermediate_size": HIDDEN}))

    ours = Transformer.from_pretrained(folder, dtype=torch.float32).eval()
    assert (ours.args.hidden_dim, ours.args.vocab_size, ours.args.rope_theta) == (
        HIDDEN, cfg["vocab_size"], cfg["rope_theta"])
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = Tokenizer.from_pretrained(smollm2_dir)
    ids = torch.tensor([tok.encode("def fibonacci(n):\n    \"\"\"The n-th Fibonacci number.\"\"\"\n"
                                   "    a, b = 0, 1\n    for _ in range(n):\n")])
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
