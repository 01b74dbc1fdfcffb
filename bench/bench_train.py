"""Training throughput and MFU of the engine on this machine, in one of two modes.

Presets (the default): the tiny and small (~100M non-embedding parameters) presets, fp32 and bf16
autocast, one process, through train_code.py.

    python bench/bench_train.py [--tokenizer ../shared/data/llama2/tokenizer.model] [--steps 6] \
        [--threads 1]

MFU is against the CPU peak in train.PEAK_FLOPS (matmul rates measured on this project's 2-core
machines). On a shared machine other work slows everything down, so the script also measures a
big matmul right before each run and reports the engine's FLOP rate against that too ("of matmul").
Means over steps 3 and on.

Side by side (--init DIR, an HF folder: SmolLM2-135M-Instruct, which scripts/gguf_to_hf.py
converts): train_infill.py's training step on that model, bf16 autocast, in separate processes
that take turns step by step, so that other work on the machine slows them alike:
- `main`: the step before issue 23 (train.train_step with the model's (B, T, V) fp32 logits and
  F.cross_entropy, glibc's default allocator, eager),
- `engine`: the engine's step as it is (model.linear_cross_entropy, train.keep_freed_memory),
- `compiled`: the same with --compile (each block compiled by torch.compile).
Each reports tokens/s (wall), tokens per CPU-second, the ratio to `main`, and the FLOP rate
(train.flops_per_token) as a share of the best bf16 matmul rate measured between the rounds.
The sides read the same batches, so their losses should agree to bf16 rounding (printed).

    python bench/bench_train.py --init SMOLLM2_DIR --rounds 6  # 8 x 512 tokens a step
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import IGNORE  # noqa: E402
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


# --------------------------------------------------------------------------------------------------
# Side by side: the step before issue 23 against the engine's, on a real model

SIDES = ("main", "engine", "compiled")


class PlainLoss(torch.nn.Module):
    """The loss of the step before issue 23, called as train.train_step calls the model: the
    model's (B, T, V) fp32 logits, then F.cross_entropy summed over the targets that are not
    IGNORE."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, targets):
        return F.cross_entropy(self.model(x).flatten(0, 1), targets.flatten(),
                               ignore_index=IGNORE, reduction="sum")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def build_side(side: str, flags: list, d):
    """One side's training set-up as train_infill.py makes it (tokenizer with the infilling
    tokens, FIM batches, the model from --init, fused AdamW) on the process `d`; returns
    (step(k) -> loss, FLOPs per token). `main` trains through PlainLoss."""
    import train
    import train_infill
    args = train_infill.parser().parse_args(flags + (["--compile"] if side == "compiled" else []))
    tok, tok_path, transform, _ = train.check_setup(args, train_infill.setup,
                                                    train.Dist(0, 1, None, None))
    batches = train.setup_data(args, tok, tok_path, transform, d)
    model = train.build_model(args, tok, d, resuming=False)
    opt = train.make_optimizer(model, args)
    fpt = train.flops_per_token(model.args, args.seq_len)
    if side == "main":
        model = PlainLoss(model)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    return lambda k: train.train_step(k, model, opt, batches, args, d, autocast)[1], fpt


def step_worker(side: str, flags: list, threads: int, conn):
    """One side in its own process: one optimizer step per "step" received, answered with
    (wall s, CPU s, loss, peak RSS GB)."""
    torch.set_num_threads(threads)
    import train
    # main: without train.keep_freed_memory (setup_distributed's), the allocator as it was
    d = train.Dist(0, 1, torch.device("cpu"), None) if side == "main" else train.setup_distributed()
    step, fpt = build_side(side, flags, d)
    conn.send(fpt)
    k = 0
    while conn.recv() == "step":
        k += 1
        t0, c0 = time.perf_counter(), cpu_seconds()
        loss = step(k)
        conn.send((time.perf_counter() - t0, cpu_seconds() - c0, loss,
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))


def peak_matmul_rate() -> tuple:
    """The best bf16 FLOP/s, per second of wall time and per CPU-second, of a few matmuls of this
    model's shapes and a square one (AMX: the (tokens x 576) @ (576 x 1536) of SmolLM2's FFN is
    about the fastest)."""
    best = (0.0, 0.0)
    for m, k, n in ((2048, 576, 1536), (2048, 1536, 576), (2048, 2048, 2048)):
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        for _ in range(2):
            a @ b
        t0, c0 = time.perf_counter(), cpu_seconds()
        for _ in range(10):
            a @ b
        flops = 2 * m * k * n * 10
        best = max(best[0], flops / (time.perf_counter() - t0)), max(best[1],
                                                                     flops / (cpu_seconds() - c0))
    return best


def bench_steps(args):
    import multiprocessing as mp
    import statistics
    print(f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())} on "
          f"{os.cpu_count()} cores; {args.threads} thread(s) per side; {args.batch_tokens} "
          f"tokens per step in sequences of {args.seq_len}, micro-batches of {args.micro_batch}",
          flush=True)
    ctx = mp.get_context("spawn")  # fresh processes: each its own allocator and compile state
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--init", args.init, "--data", str(STDLIB / "email"), "--data-cache",
                 str(Path(tmp) / "data"), "--steps", "1000", "--seq-len", str(args.seq_len),
                 "--batch-tokens", str(args.batch_tokens), "--micro-batch",
                 str(args.micro_batch), "--lr", "1e-5", "--warmup", "1", "--eval-every", "0"]
        workers = {}
        for side in args.sides:  # one after the other: the first tokenizes the data once
            here, there = ctx.Pipe()
            proc = ctx.Process(target=step_worker, daemon=True, args=(
                side, flags + ["--out", str(Path(tmp) / side)], args.threads, there))
            proc.start()
            workers[side] = (proc, here)
            fpt = here.recv()
        results = {side: [] for side in args.sides}
        rates = []
        for r in range(1 + args.rounds):  # round 0 warms up (allocation, compilation)
            order = args.sides if r % 2 else args.sides[::-1]
            for side in order:
                workers[side][1].send("step")
                results[side].append(workers[side][1].recv())
            rates.append(peak_matmul_rate())
            print(f"round {r}: " + " | ".join(
                f"{side} {args.batch_tokens / results[side][-1][0]:,.0f} tok/s, loss "
                f"{results[side][-1][2]:.4f}" for side in args.sides)
                + f" | matmul {rates[-1][0] / 1e9:,.0f} GFLOP/s | load {os.getloadavg()[0]:.2f}",
                flush=True)
        for proc, conn in workers.values():
            conn.send("stop")
            proc.join()
    peak = [statistics.median(r[i] for r in rates[1:]) for i in (0, 1)]
    base = None
    print(f"median over rounds 1-{args.rounds}; best bf16 matmul {peak[0] / 1e9:,.0f} GFLOP/s, "
          f"{peak[1] / 1e9:,.0f} per CPU-s ({args.threads} thread(s)); {fpt / 1e6:,.0f} MFLOP "
          "per token")
    for side in args.sides:
        rows = results[side][1:]
        wall = args.batch_tokens / statistics.median(w for w, _, _, _ in rows)
        cpu = args.batch_tokens / statistics.median(c for _, c, _, _ in rows)
        base = base or (wall, cpu)
        print(f"{side:>9}: {wall:7,.0f} tokens/s ({wall / base[0]:.2f}x) | {cpu:7,.0f} tokens "
              f"per CPU-s ({cpu / base[1]:.2f}x) | matmul peak: {100 * fpt * wall / peak[0]:4.1f}%"
              f" of its wall rate, {100 * fpt * cpu / peak[1]:4.1f}% per CPU-s | peak RSS "
              f"{max(m for _, _, _, m in rows):.2f} GB | first step {results[side][0][0]:.0f} s")
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--init", help="an HF folder: the side-by-side mode on that model")
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/llama2/tokenizer.model"),
                   help="the tokenizer of the presets' runs")
    p.add_argument("--steps", type=int, default=6,
                   help="optimizer steps per run (presets)")
    p.add_argument("--rounds", type=int, default=4,
                   help="measured steps of each side, after one warm-up step (side by side)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                   help="the steps compared (side by side; ratios are to the first)")
    p.add_argument("--seq-len", type=int,
                   help="tokens per sequence; None: 256 (presets), 512 (side by side)")
    p.add_argument("--batch-tokens", type=int,
                   help="tokens per optimizer step; None: 2,048 (presets), 4,096 (side by side)")
    p.add_argument("--micro-batch", type=int, default=2,
                   help="sequences per forward pass (side by side; presets: the whole batch)")
    p.add_argument("--presets", nargs="+", default=["tiny", "small"],
                   help="model presets measured")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads of the training process (OMP_NUM_THREADS)")
    args = p.parse_args()
    side_by_side = args.init is not None
    args.seq_len = args.seq_len or (512 if side_by_side else 256)
    args.batch_tokens = args.batch_tokens or (4096 if side_by_side else 2048)
    torch.set_num_threads(args.threads)
    if side_by_side:
        return bench_steps(args)
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
