"""model.py and sample.py side by side with transformers (the reference), on this machine, in one
run.

    python bench/bench_model.py                 # all three measurements
    python bench/bench_model.py --only train    # or decode / load

- train: tokens/s of one training step (forward, backward, AdamW) of the same config, fp32 and bf16
  autocast. Targets (issue 2): >= 1.0x transformers in fp32, >= 1.2x under bf16 autocast.
- decode: greedy decode tokens/s of sample.generate vs transformers' generate on
SmolLM2-135M-Instruct
  (the real model the tests convert from its GGUF), same prompt, same number of new tokens, prefill
  excluded. Target: >= 1.3x in fp32; bf16 weights reported too. With --compile, both compiled
  as well (fp32): ours through generate(compile=True), transformers through its static cache and
  compile_config, Inductor's C++ wrapper for both; each compiles once before timing (minutes).
- load: peak resident memory of Transformer.from_pretrained relative to the weights' size on disk
  (target <= 1.2x), with transformers' figure beside it.

Rounds alternate ours / theirs so that a busy machine slows both alike; we report medians and
ratios.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from model import ModelArgs, Transformer  # noqa: E402


def median_rates(fns, rounds):
    """Call each fn once per round, alternating; return the median of what each returns."""
    results = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            results[name].append(fn())
    return {name: statistics.median(v) for name, v in results.items()}


# ------------------------------------------------------------------------------------------------
def bench_train(rounds, steps, batch, seq):
    import transformers

    # SmolLM2-135M's shape (GQA 9/3 heads, tied embeddings) at 12 of its 30 layers, to keep a round
    # short
    cfg = dict(dim=576, n_layers=12, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_hidden=1536,
               tie_embeddings=True, max_seq_len=2048, norm_eps=1e-5)
    args = ModelArgs(**cfg)
    hf_cfg = transformers.LlamaConfig(
        hidden_size=576, num_hidden_layers=12, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, intermediate_size=1536, tie_word_embeddings=True,
        max_position_embeddings=2048, rms_norm_eps=1e-5, attn_implementation="sdpa")
    x = torch.randint(0, 49152, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    tokens = batch * seq
    rows = []
    for dtype in ["fp32", "bf16"]:
        torch.manual_seed(0)
        ours = Transformer(args)
        ours.init_weights()
        theirs = transformers.LlamaForCausalLM(hf_cfg)
        models = {"ours": (ours, lambda m, t: m(t)),
                  "transformers": (theirs, lambda m, t: m(input_ids=t).logits)}
        # fused AdamW for both: train.py's optimizer, and transformers' Trainer default
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
                for k, (m, _) in models.items()}

        def runner(name):
            m, fwd = models[name]

            def step():
                with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
                    logits = fwd(m, x[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)

            def timed():
                t = time.perf_counter()
                for _ in range(steps):
                    step()
                return steps * tokens / (time.perf_counter() - t)

            step()  # warm-up: allocator, optimizer state
            return timed

        rates = median_rates({k: runner(k) for k in models}, rounds)
        n = args.num_params()
        flops = 6 * n + 12 * args.n_layers * args.dim * seq  # per token, incl. attention
        rows.append({"dtype": dtype, "ours_tok_s": rates["ours"], "hf_tok_s": rates["transformers"],
                     "ratio": rates["ours"] / rates["transformers"],
                     "ours_gflops": rates["ours"] * flops / 1e9})
        print(f"train {dtype}: ours {rates['ours']:.0f} tok/s "
              f"({rows[-1]['ours_gflops']:.0f} GFLOP/s), "
              f"transformers {rates['transformers']:.0f} tok/s, ratio {rows[-1]['ratio']:.2f}x",
              flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
def smollm2_folder():
    from gguf_to_hf import cached_conversion

    return cached_conversion()


def bench_decode(rounds, new_tokens, compile=False):
    import transformers

    from prompts import format_dialog
    from tokenizer import Tokenizer
    from sample import generate

    folder = smollm2_folder()
    tok = Tokenizer.from_pretrained(folder)
    prompt = format_dialog(tok, [{"role": "user", "content": "Write a Python function that checks "
                                  "whether a string is a palindrome, with a docstring."}])
    rows = []
    runs = [(torch.float32, False), (torch.bfloat16, False)] + [(torch.float32, True)] * compile
    for dtype, compiled in runs:
        ours = Transformer.from_pretrained(folder, dtype=dtype).eval()
        theirs = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        ids = torch.tensor([prompt])
        static = {}
        if compiled:
            config = transformers.CompileConfig(mode=None, options={"cpp_wrapper": True})
            config._compile_all_devices = True  # generate compiles only on GPUs without it
            static = dict(cache_implementation="static", compile_config=config)

        def ours_time(n):
            t = time.perf_counter()
            out = generate(ours, prompt, n, temperature=0.0, compile=compiled)[0]
            assert len(out) == n
            return time.perf_counter() - t

        def theirs_time(n):
            t = time.perf_counter()
            with torch.no_grad():
                out = theirs.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      attention_mask=torch.ones_like(ids), pad_token_id=0,
                                      **static)
            assert out.shape[1] == len(prompt) + n
            return time.perf_counter() - t

        # decode rate = (n - 1) / (time for n tokens - time for 1 token): the prefill cancels out
        def rate(fn):
            return lambda: (new_tokens - 1) / (fn(new_tokens) - fn(1))

        if compiled:  # compile first (timed), at the lengths the rounds use
            for which, fn in [("ours", ours_time), ("transformers", theirs_time)]:
                print(f"decode compiled: {which} compiles in {fn(new_tokens):.0f} s", flush=True)
                fn(1)
        ours_time(4), theirs_time(4)  # warm-up
        rates = median_rates({"ours": rate(ours_time), "transformers": rate(theirs_time)}, rounds)
        name = str(dtype).split(".")[-1] + " compiled" * compiled
        rows.append({"dtype": name, "ours_tok_s": rates["ours"], "hf_tok_s": rates["transformers"],
                     "ratio": rates["ours"] / rates["transformers"]})
        print(f"decode {name}: ours {rates['ours']:.1f} tok/s, transformers "
              f"{rates['transformers']:.1f} tok/s, ratio {rows[-1]['ratio']:.2f}x", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
LOAD_SNIPPET = """
import sys, torch
sys.path.insert(0, {root!r})


def peak_bytes():
    # VmHWM: this process image's peak resident set. Not ru_maxrss, which a child started by a big
    # parent inherits (fork copies the parent's high-water mark, and exec keeps it).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024


if {which!r} == "ours":
    from model import Transformer
    before = peak_bytes()
    m = Transformer.from_pretrained({folder!r}, dtype=torch.float32)
else:
    import transformers
    before = peak_bytes()
    m = transformers.LlamaForCausalLM.from_pretrained({folder!r}, dtype=torch.float32)
# safetensors may map the file rather than copy it: read every weight, so that the pages are
# resident and counted, as they are once the model runs
for p in m.parameters():
    p.float().sum()
print(peak_bytes() - before)
"""


def bench_load():
    folder = smollm2_folder()
    disk = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    row = {"disk_mb": disk / 2**20}
    for which in ["ours", "transformers"]:
        code = LOAD_SNIPPET.format(root=str(ROOT), which=which, folder=str(folder))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        peak = int(out.stdout.strip().splitlines()[-1])
        row[f"{which}_peak_mb"] = peak / 2**20
        row[f"{which}_ratio"] = peak / disk
    print(f"load: weights on disk {row['disk_mb']:.0f} MB; peak memory added by from_pretrained "
          "and reading every weight: "
          "ours "
          f"{row['ours_peak_mb']:.0f} MB ({row['ours_ratio']:.2f}x), transformers "
          f"{row['transformers_peak_mb']:.0f} MB ({row['transformers_ratio']:.2f}x)", flush=True)
    return row


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--only", choices=["train", "decode", "load"],
                   help="one measurement only (default: all three)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds per measurement, alternating the two sides")
    p.add_argument("--train-steps", type=int, default=2, help="steps per round")
    p.add_argument("--batch", type=int, default=4,
                   help="sequences per training step")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=64,
                   help="tokens decoded per round")
    p.add_argument("--compile", action="store_true",
                   help="decode: also both compiled (fp32), as sample.py --compile does")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    results = {}
    if a.only in (None, "train"):
        results["train"] = bench_train(a.rounds, a.train_steps, a.batch, a.seq_len)
    if a.only in (None, "decode"):
        results["decode"] = bench_decode(a.rounds, a.new_tokens, a.compile)
    if a.only in (None, "load"):
        results["load"] = bench_load()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
