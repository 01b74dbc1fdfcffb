"""Training throughput and MFU of the engine on this machine: the tiny and small (~100M
non-embedding parameters) presets, fp32 and bf16 autocast, one process, through train_code.py.

    python bench/bench_train.py [--tokenizer ../shared/data/llama2/tokenizer.model] [--steps 6] \
        [--threads 1]

MFU is against the CPU peak in train.PEAK_FLOPS (matmul rates measured on this project's 2-core
machines). On a shared machine other work slows everything down, so the script also measures a
big matmul right before each run and reports the engine's FLOP rate against that too ("of matmul").
Means over steps 3 and on.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train import PEAK_FLOPS  # noqa: E402

STDLIB = Path(os.__file__).parent


def matmul_rate(dtype, n=20) -> float:
    """FLOP/s of a (2048 x 768) @ (768 x 2048) matmul: 2,048 tokens through the small preset's
    FFN."""
    a, b = torch.randn(2048, 768, dtype=dtype), torch.randn(768, 2048, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 2048 * 768 * 2048 * n / (time.perf_counter() - t0)


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/llama2/tokenizer.model"),
                   help="the tokenizer of the runs")
    p.add_argument("--steps", type=int, default=6,
                   help="optimizer steps per run")
    p.add_argument("--seq-len", type=int, default=256,
                   help="tokens per sequence")
    p.add_argument("--batch-tokens", type=int, default=2048,
                   help="tokens per optimizer step")
    p.add_argument("--presets", nargs="+", default=["tiny", "small"],
                   help="model presets measured")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads of the training process (OMP_NUM_THREADS)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, "
          f"{args.threads} thread(s); "
          f"{args.batch_tokens} tokens per step in sequences of {args.seq_len}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for dtype in ("fp32", "bf16"):
                out = Path(tmp) / f"{preset}-{dtype}"
                cmd = [sys.executable, "train_code.py", "--init", preset, "--tokenizer",
                       args.tokenizer, "--data", str(STDLIB / "email"), "--out", str(out),
                       "--data-cache", str(Path(tmp) / "data"), "--steps", str(args.steps),
                       "--seq-len", str(args.seq_len), "--batch-tokens", str(args.batch_tokens),
                       "--micro-batch", str(args.batch_tokens // args.seq_len), "--lr", "3e-4",
                       "--warmup", "2", "--eval-every", "0", "--ckpt-every", str(args.steps),
                       "--dtype", dtype]
                rate = matmul_rate(torch.bfloat16 if dtype == "bf16" else torch.float32)
                r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if r.returncode:
                    sys.exit(r.stdout[-2000:] + r.stderr[-2000:])
                rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
                rows = rows[2:]
                mean = lambda k: sum(m[k] for m in rows) / len(rows)  # noqa: E731
                params = next(l for l in r.stdout.splitlines() if l.startswith("model:"))
                rss = max(m["peak_mem_gb"] for m in rows)
                peak = PEAK_FLOPS["cpu"][0 if dtype == "bf16" else 1] * args.threads
                flops = mean("mfu") * peak
                print(f"{preset:>5} {dtype}: {mean('tokens_per_s'):8,.0f} tokens/s | MFU "
                      f"{100 * mean('mfu'):5.1f}% | {flops / 1e9:5.0f} GFLOP/s = "
                      f"{100 * flops / rate:3.0f}% of matmul ({rate / 1e9:.0f} GFLOP/s just before)"
                      f" | peak RSS {rss:.2f} GB | {params.split(',')[0][7:]}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
