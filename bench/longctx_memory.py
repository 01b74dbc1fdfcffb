"""Peak memory of one long-context training step against the sequence length: linear, not quadratic.

Each length runs in a fresh process: train_longctx.py itself for one optimizer step of the tiny
preset (forward, backward, AdamW; bf16 autocast and activation checkpointing, as that stage runs by
default), one sequence per step. The figure is the engine's `peak_mem_gb` of that step: the
process's peak RSS on CPU (peak allocated memory on a GPU). Attention goes through SDPA's fused
kernels, which never build the T x T score matrix; were it built, the fp32
scores alone of the tiny preset's 8 heads would take 8 GiB at 16k tokens, 0.5 GiB at 4k.

    python bench/longctx_memory.py [--lengths 2048 4096 8192 16384] [--no-activation-checkpointing]

Pass: peak(16k) / peak(4k) <= 4.5 (16x for a quadratic term, 4x for a purely linear one; the fixed
part, weights and the Python process, pulls it below 4). The increments tell the same more sharply:
(peak(16k) - peak(8k)) / (peak(8k) - peak(4k)) is 2 for linear growth and 4 for quadratic.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import prepare, summary  # noqa: E402

STDLIB = Path(os.__file__).parent


def one_step(length, data, tokenizer, out, checkpointing) -> dict:
    cmd = [sys.executable, "train_longctx.py", "--init", "tiny", "--tokenizer", str(tokenizer),
           "--data", str(data), "--out", str(out), "--steps", "1", "--seq-len", str(length),
           "--batch-tokens", str(length), "--micro-batch", "1", "--warmup", "1",
           "--eval-every", "0", "--ckpt-every", "1",
           "--activation-checkpointing" if checkpointing else "--no-activation-checkpointing"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/llama2/tokenizer.model"),
                   help="the vocabulary sets the size of the logits, a large part of the memory")
    p.add_argument("--data", default=str(STDLIB / "email"), help="any code: only its length counts")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384],
                   help="sequence lengths measured")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                   default=True, help="as train_longctx.py runs by default")
    args = p.parse_args()
    if not Path(args.tokenizer).exists():
        sys.exit(f"error: --tokenizer {args.tokenizer} does not exist")
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        # tokenized here, once, so no run's peak includes tokenizing
        print(f"data: {summary(prepare([args.data], args.tokenizer, data, progress=False))}")
        for length in args.lengths:
            m = one_step(length, data, args.tokenizer, Path(tmp) / str(length),
                         args.activation_checkpointing)
            rows.append((length, m["peak_mem_gb"], m["tokens_per_s"]))
            print(f"seq {length:>6}: peak {m['peak_mem_gb']:.3f} GiB, {m['tokens_per_s']:,.0f} "
                  "tokens/s", flush=True)
    peak = {length: gb for length, gb, _ in rows}
    print("\n| tokens | peak RSS (GiB) | x the first | tokens/s |\n|---|---|---|---|")
    for length, gb, tps in rows:
        print(f"| {length} | {gb:.3f} | {gb / rows[0][1]:.2f} | {tps:,.0f} |")
    if {4096, 8192, 16384} <= set(peak):
        ratio = peak[16384] / peak[4096]
        steps = (peak[16384] - peak[8192]) / (peak[8192] - peak[4096])
        print(f"\npeak(16k) / peak(4k) = {ratio:.2f} (pass: <= 4.5); increments "
              f"(16k - 8k) / (8k - 4k) = {steps:.2f} (linear 2, quadratic 4): "
              f"{'PASS' if ratio <= 4.5 else 'FAIL'}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
