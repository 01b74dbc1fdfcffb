"""Is infilling nearly free? Code Llama's Table 5 (and Bavarian et al. 2022's FIM-for-free result)
in miniature.

The tiny preset is trained twice through train_infill.py on the same Python corpus, for the same
steps, from the same initial weights and data order: once with --fim-rate 0.9 (the paper's) and
once with 0 (plain next-token prediction; the vocabulary still has the four infilling tokens, so
the two models differ only by the transform). The two runs go side by side, one thread each. Then,
on files neither run trained on:

- the autoregressive held-out loss of both (BOS + file + EOS, packed into --seq-len windows): the
  paper found it unchanged by FIM (Table 5: 0.407 vs 0.408 at 7B);
- single-line infilling on held-out functions: each code line of a function's body is masked in
  turn (indentation and line end included, as in HumanEval single-line infilling), in three
  modes: Code Llama's PSM and SPM prompts (format_infill), and the prefix alone continued left to
  right, the baseline an AR model can do. Two scores per mode: exact match of the greedy middle
  (generation stops at <EOT>, EOS or the first line end; the first line is compared, blind to
  trailing whitespace: eval.infill_exact), and the loss of the true middle in nats per character
  (comparable across modes, whose tokens differ).

Corpus: the interpreter's standard library (its tests, idlelib and lib2to3 left out; --corpus
adds or replaces folders), every file cut where a top-level or nested `def`/`class` line starts,
so that most documents fit in one 256-token context and can be made into infilling examples (only
those are, sec. 2.3), tokenized once by every core. One file in 20 (by a hash of its path inside
its folder, so the same file is held out on any machine) is held out. The tokenizer is a
2,000-piece SentencePiece BPE trained on the first 32 MB of the training files (Llama's settings:
byte fallback, split digits), extended by train_infill.py with the infilling tokens: the tiny
preset is then 4.0M parameters instead of 19M with Llama 2's 32,000 pieces. --tokenizer takes
Llama 2's instead.

    python bench/fim_vs_ar.py --out runs/fim-vs-ar     # 36 min on 2 cores at load average 7-10

At that size (about 1M training tokens each) the AR losses are within a few percent, but neither
model infills yet (exact match ~0 in every mode). On a GPU machine, with the Python of the
interpreter's site-packages as well (a 200 MB hash-ordered sample, 78M tokens), train there and
evaluate here (the runs' hf/ and metrics.jsonl copied into the same --out are not retrained):

    python bench/fim_vs_ar.py --out OUT --corpus STDLIB SITE_PACKAGES --corpus-mb 200 \
        --steps 6000 --batch-tokens 32768 --micro-batch 128 --warmup 200 --train-only   # GPU
    python bench/fim_vs_ar.py --out OUT --corpus STDLIB SITE_PACKAGES --corpus-mb 200 \
        --steps 6000 --batch-tokens 32768 --micro-batch 128 --warmup 200 \
        --tasks 1000 --eval-windows 512                                               # here

Measured (one H200, both runs side by side, ~0.85M / 1.1M tokens/s; 1,000 held-out tasks):

| tokens | model | AR loss | exact match PSM / SPM / prefix only | nats/char PSM / SPM / prefix |
|---|---|---|---|---|
| 197M (6000 x 32k) | FIM 0.9 | 1.9680 | 0.002 / 0.081 / 0.074 | 0.605 / 0.466 / 0.509 |
| 197M | no FIM | 1.9551 | 0.000 / 0.074 / 0.080 | 0.760 / 0.469 / 0.502 |
| 295M (4500 x 64k) | FIM 0.9 | 1.9371 | 0.001 / 0.089 / 0.077 | 0.582 / 0.453 / 0.504 |
| 295M | no FIM | 1.9621 | 0.000 / 0.078 / 0.087 | 0.800 / 0.469 / 0.493 |

FIM costs nothing on the AR loss (+0.7%, then -1.3%), as Table 5 found, but the 4M-parameter model
does not yet infill better than it completes: SPM, where the middle continues the prefix, matches
the prefix-only baseline (its suffix lowers the middle's loss by ~3% over the plain model's, a gain
too small for exact match to show), and PSM fails. Its middles start inside a word, the way most
training middles start (split points are uniform over characters): the model has not learnt to
find where the prefix ended, the token before <SUF>, from across the suffix, the induction-like
lookup PSM needs; 1.5x more tokens moved PSM's middle loss only from 0.605 to 0.582 nats/char.

Six times the parameters: the `mini` preset (25M; 8 layers of 512), on a 400 MB sample (115M
tokens), one H200 again (0.35M / 0.40M tokens/s side by side; the steps were sized to the time left
by a 30-step probe), evaluated here on the same kind of 1,000 tasks:

    python bench/fim_vs_ar.py --out OUT --corpus STDLIB SITE_PACKAGES --corpus-mb 400 \
        --preset mini --steps 2023 --batch-tokens 65536 --micro-batch 256 --lr 1e-3 \
        --warmup 200 --train-only       # on the GPU; then here the same flags, with
                                        # --tasks 1000 --eval-windows 512 for --train-only

| tokens | model | AR loss | exact match PSM / SPM / prefix only | nats/char PSM / SPM / prefix |
|---|---|---|---|---|
| 133M (2023 x 64k) | FIM 0.9 | 1.7985 | 0.012 / 0.109 / 0.097 | 0.481 / 0.407 / 0.460 |
| 133M | no FIM | 1.8018 | 0.000 / 0.108 / 0.118 | 0.727 / 0.419 / 0.451 |

FIM is free again (-0.2%) and the FIM model's suffix now lowers the middle's loss by 12% (SPM vs
prefix only), but a plain model handed the same SPM prompt, the suffix read as earlier code, gets
most of that (7%), and its plain completion is the best exact match of all (0.118 vs the FIM
model's best, SPM, 0.109; paired on the same tasks, 29 lines right only with FIM and 38 only
without: McNemar z = -1.1, no clear difference either way). PSM is still near 0.
At 25M parameters and 133M tokens, infilling beyond what a left-to-right model does with the
suffix as context has not emerged; the paper's models are 7B and 13B, trained on 500B tokens.

A lead for PSM, not yet settled: packed back to back, a third of the infilling examples are cut
at a context boundary (843 of 2,557 in 40 batches of the standard library at 256 tokens), so a PSM
middle is often trained without its prefix in view. --whole-docs keeps every document that fits
whole (9% of the tokens are then padding). On this CPU, FIM 0.9 with and without it (tiny preset,
1,100 steps of 8,192 tokens, 9M tokens of the standard library alone, one thread each; 500 tasks):
PSM middle 0.891 vs 0.903 nats/char, SPM 0.765 vs 0.759, AR loss 3.040 vs 3.003; neither model
infills yet (exact match 0.00 in PSM, 0.04 in SPM), so this scale cannot tell. Next: the GPU
comparison above with --whole-docs on both runs.
"""

import ast
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_atomic  # noqa: E402
from data import format_infill, prepare, summary  # noqa: E402
from eval import infill_decoder, infill_exact  # noqa: E402
from sample import generate, load  # noqa: E402

STDLIB = Path(os.__file__).parent
SKIP = {"site-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo",
        "ensurepip", "pydoc_data"}
DEFINITION = re.compile(r"\n(?=[ \t]*(?:async[ \t]+)?(?:def|class)[ \t])")


def split_files(roots, max_mb):
    """(training files, held-out files) of the Python files under `roots`: one in 20 held out, by
    a hash of the path. Files are taken in the order of that hash up to max_mb of training text
    (0: all), and held-out files up to a twentieth of it, so a capped corpus is a random sample."""
    files = []
    for root in roots:
        for f in root.rglob("*.py"):
            rel = f.relative_to(root)
            if not SKIP & set(rel.parts) and f.is_file():
                files.append((hashlib.sha256(str(rel).encode()).hexdigest(), f))
    train, held, size = [], [], [0, 0]
    for h, f in sorted(files):
        k = int(int(h, 16) % 20 == 0)
        cap = max_mb * 2**20 / (20 if k else 1)
        if not max_mb or size[k] < cap:
            (held if k else train).append(f)
            size[k] += f.stat().st_size
    return train, held


def write_corpus(files, path):
    """One JSONL record per definition-sized piece of each file."""
    rows = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        pieces = DEFINITION.split(text)
        for k, piece in enumerate(pieces):
            piece += "\n" if k + 1 < len(pieces) else ""  # the split ate a line end
            if piece.strip():
                rows.append(json.dumps({"text": piece, "lang": "python"}) + "\n")
    write_atomic(path, "".join(rows))
    return len(rows)


def train_tokenizer(files, path, vocab_size, max_mb=32):
    """Llama's settings on the lines of the first max_mb of `files` (a hash-ordered sample)."""
    import sentencepiece as spm
    lines, size = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        lines += text.splitlines()
        size += len(text)
        if size > max_mb * 2**20:
            break
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")),
        vocab_size=vocab_size, model_type="bpe", normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, byte_fallback=True,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return path


def infill_tasks(files, tok, max_tokens):
    """Single-line tasks on every function of `files` that fits in max_tokens: each non-empty,
    non-comment line of its body (docstring left out) is a middle, the function's text around it
    prefix and suffix."""
    tasks = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            body = node.body
            if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):  # the docstring
                body = body[1:]
            if not body:
                continue
            func = lines[start:node.end_lineno]
            if len(tok.encode("".join(func))) > max_tokens:
                continue
            for i in range(body[0].lineno - 1, node.end_lineno):
                if lines[i].strip() and not lines[i].strip().startswith("#"):
                    tasks.append({"where": f"{f}:{i + 1}",
                                  "prefix": "".join(lines[start:i]), "middle": lines[i],
                                  "suffix": "".join(lines[i + 1:node.end_lineno])})
    return tasks


def train_cmd(args, tok_path, corpus, fim_rate, out):
    return [sys.executable, "train_infill.py", "--init", args.preset, "--tokenizer", str(tok_path),
            "--data", str(corpus), "--out", str(out), "--fim-rate", str(fim_rate),
            "--steps", str(args.steps), "--seq-len", str(args.seq_len),
            "--batch-tokens", str(args.batch_tokens), "--micro-batch", str(args.micro_batch),
            "--lr", str(args.lr), "--warmup", str(args.warmup),
            "--ckpt-every", str(max(100, args.steps // 10)), "--eval-every", "0",
            "--dtype", "bf16", "--seed", str(args.seed)] + ["--whole-docs"] * args.whole_docs


def finished(out: Path, steps: int) -> bool:
    """A run whose export is written after its last step (such as one trained on another machine
    and copied here without its checkpoints) is not trained again."""
    metrics = out / "metrics.jsonl"
    return ((out / "hf" / "model.safetensors").exists() and metrics.exists()
            and json.loads(metrics.read_text().splitlines()[-1])["step"] == steps)


def train_both(args, tok_path, corpus, runs):
    """The two runs side by side, one thread each (two processes use two busy cores better than
    one process with two threads)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, t0 = {}, time.time()
    for name, rate in runs.items():
        out = args.out / name
        if finished(out, args.steps):
            continue
        with open(args.out / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(train_cmd(args, tok_path, corpus, rate, out), cwd=ROOT,
                                           stdout=log, stderr=subprocess.STDOUT, env=env)
    for name, proc in procs.items():
        if proc.wait():
            sys.exit(f"{name} failed: see {args.out / name}.log")
    stats = {}
    for name in runs:
        rows = [json.loads(x) for x in (args.out / name / "metrics.jsonl").read_text().splitlines()]
        last = rows[-20:]
        stats[name] = {"train_loss_last_20": sum(r["loss"] for r in last) / len(last),
                       "tokens": rows[-1]["tokens"],
                       "train_minutes": (time.time() - t0) / 60 if name in procs else None}
    return stats


@torch.no_grad()
def ar_loss(model, tok, files, seq_len, n_windows):
    """Mean next-token loss on BOS + file + EOS of the held-out files, packed into windows."""
    ids = []
    for f in files:
        ids += tok.encode(f.read_text(encoding="utf-8", errors="replace"), bos=True, eos=True)
        if len(ids) > n_windows * seq_len + 1:
            break
    n = min(n_windows, (len(ids) - 1) // seq_len)
    x = torch.tensor([ids[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)],
                     device=model.tok_embeddings.weight.device)
    total = 0.0
    for i in range(0, n, 16):
        logits = model(x[i:i + 16, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), x[i:i + 16, 1:].flatten(),
                                 reduction="sum").item()
    return total / (n * seq_len), n * seq_len


def prompt_and_middle(tok, task, mode):
    """The prompt of a mode and the ids the model should write: PSM, SPM (Code Llama's layouts,
    format_infill) or l2r (BOS + the prefix alone, continued: what an AR model can do). In SPM
    and l2r the middle continues the prefix's tokens; a line start is a token boundary here."""
    if mode == "psm":
        return format_infill(tok, task["prefix"], task["suffix"]), \
            tok.encode_infilling(task["middle"])
    head = tok.encode(task["prefix"])
    whole = tok.encode(task["prefix"] + task["middle"])
    assert whole[:len(head)] == head, task["where"]
    prompt = (format_infill(tok, task["prefix"], task["suffix"], suffix_first=True)
              if mode == "spm" else tok.encode(task["prefix"], bos=True))
    return prompt, whole[len(head):]


@torch.no_grad()
def infill_scores(model, tok, tasks, mode, max_new_tokens):
    """(exact match per task, nats per character of the true middle) over the tasks, in one mode.
    Generation is greedy and stops at <EOT>, EOS or a line end."""
    stop_ids = {i for i in (tok.eot_id, tok.eos_id) if i is not None}
    hits, nats, chars = [], 0.0, 0
    for t in tasks:
        prompt, target = prompt_and_middle(tok, t, mode)
        device = model.tok_embeddings.weight.device
        logits = model(torch.tensor([prompt + target[:-1]], device=device))[0, len(prompt) - 1:]
        nats += F.cross_entropy(logits, torch.tensor(target, device=device),
                                reduction="sum").item()
        chars += len(t["middle"])
        decode = infill_decoder(tok, t["prefix"], mode != "psm")  # l2r decodes as SPM does
        ids = generate(model, prompt, max_new_tokens, stop_ids=stop_ids,
                       stop=lambda i, ids: "\n" in decode(ids))[0]
        middle = decode(ids)
        hits.append(int(infill_exact(middle[:middle.find("\n") + 1] or middle, t["middle"])))
    return hits, nats / chars


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/fim-vs-ar"),
                   help="folder of both runs and the comparison")
    p.add_argument("--corpus", type=Path, nargs="+", default=[STDLIB],
                   help="folders of Python files (default: the standard library)")
    p.add_argument("--corpus-mb", type=float, default=0,
                   help="training text to take from --corpus, a hash-ordered sample (0: all)")
    p.add_argument("--tokenizer", help="a SentencePiece tokenizer.model to use instead of "
                                       "training one (e.g. Llama 2's)")
    p.add_argument("--vocab-size", type=int, default=2000, help="of the trained tokenizer")
    p.add_argument("--preset", default="tiny", choices=["tiny", "mini"], help="model size (mini: "
                   "23M non-embedding parameters, for a GPU machine)")
    p.add_argument("--steps", type=int, default=450,
                   help="optimizer steps of each run")
    p.add_argument("--seq-len", type=int, default=256,
                   help="tokens per sequence")
    p.add_argument("--batch-tokens", type=int, default=2048,
                   help="tokens per optimizer step")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="sequences per forward pass")
    p.add_argument("--whole-docs", action="store_true",
                   help="never cut a document that fits across two contexts (train.py "
                        "--whole-docs; the rest of a sequence is padding)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate")
    p.add_argument("--warmup", type=int, default=40,
                   help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0,
                   help="model init, data order, task sample")
    p.add_argument("--tasks", type=int, default=200, help="single-line tasks evaluated (a seeded "
                                                          "sample of all)")
    p.add_argument("--eval-windows", type=int, default=128,
                   help="held-out windows of --seq-len tokens for the AR loss")
    p.add_argument("--max-new-tokens", type=int, default=48,
                   help="tokens generated per infilling task at most")
    p.add_argument("--train-only", action="store_true",
                   help="stop after training: evaluate later, e.g. on another machine (a finished "
                        "run copied into --out with its hf/ and metrics.jsonl is not retrained)")
    args = p.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # on a busy machine one thread beats two (OpenMP barriers wait)
    t0 = time.time()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    train_files, held_files = split_files(args.corpus, args.corpus_mb)
    runs = {"fim-0.9": 0.9, "fim-0": 0.0}
    tok_path, prepared = args.out / "tok.model", args.out / "data"
    if args.tokenizer:
        tok_path = Path(args.tokenizer).resolve()
    if not all(finished(args.out / name, args.steps) for name in runs):
        corpus = args.out / "train.jsonl"
        if not corpus.exists():
            n = write_corpus(train_files, corpus)
            print(f"corpus: {len(train_files)} training files -> {n} documents; "
                  f"{len(held_files)} files held out", flush=True)
        if not tok_path.exists():
            train_tokenizer(train_files, tok_path, args.vocab_size)
        # Tokenized once, by every core, before the two runs (which then read the shards).
        print(f"prepared: {summary(prepare([corpus], tok_path, prepared, shard_mb=4))}",
              flush=True)
    print(f"training {' and '.join(runs)} side by side, {args.steps} steps of "
          f"{args.batch_tokens} tokens (logs: {args.out}/*.log)", flush=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()},
               "runs": train_both(args, tok_path, prepared, runs)}
    print(json.dumps(results["runs"]), flush=True)
    if args.train_only:
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {name: load(args.out / name / "hf", device=device) for name in runs}
    tok = models["fim-0.9"][1]
    tasks = infill_tasks(held_files, tok, args.seq_len - args.max_new_tokens - 8)
    n_all = len(tasks)
    tasks = random.Random(args.seed).sample(tasks, min(args.tasks, n_all))
    print(f"{n_all} single-line tasks from {len(held_files)} held-out files; "
          f"evaluating {len(tasks)}", flush=True)
    modes = ("psm", "spm", "l2r")
    for name, (model, tok) in models.items():
        r = results["runs"][name]
        r["ar_loss"], r["ar_tokens"] = ar_loss(model, tok, held_files, args.seq_len,
                                               args.eval_windows)
        for mode in modes:
            t1 = time.time()
            r[f"hits_{mode}"], r[f"nats_per_char_{mode}"] = infill_scores(
                model, tok, tasks, mode, args.max_new_tokens)
            r[f"exact_{mode}"] = sum(r[f"hits_{mode}"]) / len(tasks)
            print(f"  {name} {mode}: exact match {r[f'exact_{mode}']:.3f}, middle "
                  f"{r[f'nats_per_char_{mode}']:.3f} nats/char ({time.time() - t1:.0f}s)",
                  flush=True)
    results["tasks"] = len(tasks)
    results["minutes"] = (time.time() - t0) / 60
    (args.out / "results.json").write_text(json.dumps(results, indent=1))

    print("\n| model | AR held-out loss | single-line exact match: PSM / SPM / prefix only | "
          "middle nats/char: PSM / SPM / prefix only |")
    print("|---|---|---|---|")
    for name, r in results["runs"].items():
        print(f"| {name} | {r['ar_loss']:.4f} | "
              + " / ".join(f"{r[f'exact_{m}']:.3f}" for m in modes) + " | "
              + " / ".join(f"{r[f'nats_per_char_{m}']:.3f}" for m in modes) + " |")
    a, b = results["runs"]["fim-0.9"], results["runs"]["fim-0"]
    # Paired on the same tasks: the FIM model's best infilling mode against the best the plain
    # model does with any mode, and the tasks where only one of the two is right (McNemar).
    fim = max(("psm", "spm"), key=lambda m: a[f"exact_{m}"])
    plain = max(modes, key=lambda m: b[f"exact_{m}"])
    only_fim = sum(x > y for x, y in zip(a[f"hits_{fim}"], b[f"hits_{plain}"]))
    only_plain = sum(y > x for x, y in zip(a[f"hits_{fim}"], b[f"hits_{plain}"]))
    z = (only_fim - only_plain) / max(1, only_fim + only_plain) ** 0.5
    print(f"\npaired: FIM {fim} {a[f'exact_{fim}']:.3f} vs no-FIM {plain} "
          f"{b[f'exact_{plain}']:.3f}; right only with FIM {only_fim}, only without {only_plain} "
          f"(McNemar z = {z:.1f})")
    print(f"\nAR loss, FIM vs not: {100 * (a['ar_loss'] / b['ar_loss'] - 1):+.1f}% "
          f"({a['ar_tokens']:,} held-out tokens); {len(tasks)} infilling tasks; "
          f"{a['tokens']:,} training tokens each; {results['minutes']:.1f} min; "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
