"""Is infilling nearly free? Code Llama's Table 5 (and [FIM]'s FIM-for-free result) in miniature.

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

Corpus: the interpreter's standard library (its tests, idlelib and lib2to3 left out), every file
cut where a top-level or nested `def`/`class` line starts, so that most documents fit in one
256-token context and can be made into infilling examples (only those are, sec. 2.3). One file in
20 (by a hash of its path) is held out. The tokenizer is a 2,000-piece SentencePiece BPE trained on
the training files (Llama's settings: byte fallback, split digits), extended by train_infill.py
with the infilling tokens: the tiny preset is then 4.0M parameters instead of 19M with Llama 2's
32,000 pieces. --tokenizer takes Llama 2's instead.

    python bench/fim_vs_ar.py --out runs/fim-vs-ar     # 36 min on 2 cores at load average 7-10
    python bench/fim_vs_ar.py --out runs/fim-vs-ar-long --steps 20000 --batch-tokens 16384  # GPU

What to expect at the default size (about 1M training tokens each): the AR losses within a few
percent, but no infilling yet. Using a suffix takes attention that finds where the prefix ended
(the token before <SUF>) across the whole suffix, an induction-like skill a 4-layer model does not
learn from a few million tokens; the middle's loss under the PSM prompt stays above its loss from
the prefix alone, and exact match stays near 0 for both models. Re-running with the same --out
resumes the training runs and redoes the evaluation.
"""

import argparse
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

from data import format_infill  # noqa: E402
from eval import infill_decoder, infill_exact  # noqa: E402
from sample import generate, load  # noqa: E402

STDLIB = Path(os.__file__).parent
SKIP = {"site-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo",
        "ensurepip", "pydoc_data"}
DEFINITION = re.compile(r"\n(?=[ \t]*(?:async[ \t]+)?(?:def|class)[ \t])")


def split_files():
    """(training files, held-out files) of the standard library: one in 20 held out, by path."""
    train, held = [], []
    for f in sorted(STDLIB.rglob("*.py")):
        rel = f.relative_to(STDLIB)
        if SKIP & set(rel.parts):
            continue
        h = int(hashlib.sha256(str(rel).encode()).hexdigest(), 16)
        (held if h % 20 == 0 else train).append(f)
    return train, held


def write_corpus(files, path):
    """One JSONL record per definition-sized piece of each file."""
    n = 0
    with open(path.with_suffix(".tmp"), "w") as out:
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            pieces = DEFINITION.split(text)
            for k, piece in enumerate(pieces):
                piece += "\n" if k + 1 < len(pieces) else ""  # the split ate a line end
                if piece.strip():
                    out.write(json.dumps({"text": piece, "lang": "python"}) + "\n")
                    n += 1
    os.replace(path.with_suffix(".tmp"), path)
    return n


def train_tokenizer(files, path, vocab_size):
    import sentencepiece as spm
    lines = [line for f in files for line in f.read_text(encoding="utf-8",
                                                          errors="replace").splitlines()]
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
                    tasks.append({"where": f"{f.relative_to(STDLIB)}:{i + 1}",
                                  "prefix": "".join(lines[start:i]), "middle": lines[i],
                                  "suffix": "".join(lines[i + 1:node.end_lineno])})
    return tasks


def train_cmd(args, tok_path, corpus, fim_rate, out):
    return [sys.executable, "train_infill.py", "--init", "tiny", "--tokenizer", str(tok_path),
            "--data", str(corpus), "--data-cache", str(args.out / "data"), "--out", str(out),
            "--fim-rate", str(fim_rate), "--steps", str(args.steps), "--seq-len",
            str(args.seq_len), "--batch-tokens", str(args.batch_tokens), "--micro-batch",
            str(args.micro_batch), "--lr", str(args.lr), "--warmup", str(args.warmup),
            "--ckpt-every", "100", "--eval-every", "0", "--dtype", "bf16", "--seed",
            str(args.seed)]


def train_both(args, tok_path, corpus, runs):
    """The two runs side by side, one thread each (two processes use two busy cores better than
    one process with two threads). The corpus is tokenized first, once, by a 1-step run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, logs, t0 = {}, {}, time.time()
    for name, rate in runs.items():
        out = args.out / name
        logs[name] = open(args.out / f"{name}.log", "w")
        procs[name] = subprocess.Popen(train_cmd(args, tok_path, corpus, rate, out), cwd=ROOT,
                                       stdout=logs[name], stderr=subprocess.STDOUT, env=env)
        while procs[name].poll() is None and not (out / "metrics.jsonl").exists():
            time.sleep(1)  # the first run tokenizes the corpus; the second then finds it
    for name, proc in procs.items():
        if proc.wait():
            sys.exit(f"{name} failed: see {args.out / name}.log")
        logs[name].close()
    stats = {}
    for name in runs:
        rows = [json.loads(x) for x in (args.out / name / "metrics.jsonl").read_text().splitlines()]
        stats[name] = {"train_loss_last_20": sum(r["loss"] for r in rows[-20:]) / 20,
                       "tokens": rows[-1]["tokens"], "train_minutes": (time.time() - t0) / 60}
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
    """(exact match, nats per character of the true middle) over the tasks, in one mode.
    Generation is greedy and stops at <EOT>, EOS or a line end."""
    stop_ids = {i for i in (tok.eot_id, tok.eos_id) if i is not None}
    hits, nats, chars = 0, 0.0, 0
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
        hits += infill_exact(middle[:middle.find("\n") + 1] or middle, t["middle"])
    return hits / len(tasks), nats / chars


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/fim-vs-ar"))
    p.add_argument("--tokenizer", help="a SentencePiece tokenizer.model to use instead of "
                                       "training one (e.g. Llama 2's)")
    p.add_argument("--vocab-size", type=int, default=2000, help="of the trained tokenizer")
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", type=int, default=200, help="single-line tasks evaluated (a seeded "
                                                          "sample of all)")
    p.add_argument("--eval-windows", type=int, default=128,
                   help="held-out windows of --seq-len tokens for the AR loss")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # on a busy machine one thread beats two (OpenMP barriers wait)
    t0 = time.time()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    train_files, held_files = split_files()
    corpus = args.out / "train.jsonl"
    if not corpus.exists():
        n = write_corpus(train_files, corpus)
        print(f"corpus: {len(train_files)} training files -> {n} documents; "
              f"{len(held_files)} files held out", flush=True)
    tok_path = Path(args.tokenizer).resolve() if args.tokenizer else args.out / "tok.model"
    if not tok_path.exists():
        train_tokenizer(train_files, tok_path, args.vocab_size)

    runs = {"fim-0.9": 0.9, "fim-0": 0.0}
    print(f"training {' and '.join(runs)} side by side, {args.steps} steps of "
          f"{args.batch_tokens} tokens (logs: {args.out}/*.log)", flush=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()},
               "runs": train_both(args, tok_path, corpus, runs)}
    print(json.dumps(results["runs"]), flush=True)

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
            r[f"exact_{mode}"], r[f"nats_per_char_{mode}"] = infill_scores(
                model, tok, tasks, mode, args.max_new_tokens)
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
    print(f"\nAR loss, FIM vs not: {100 * (a['ar_loss'] / b['ar_loss'] - 1):+.1f}% "
          f"({a['ar_tokens']:,} held-out tokens); {len(tasks)} infilling tasks; "
          f"{a['tokens']:,} training tokens each; {results['minutes']:.1f} min; "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
