"""Is infilling nearly free? Code Llama's Table 5 (and Bavarian et al. 2022's FIM-for-free result)
in miniature.

The tiny preset is trained twice through train_infill.py on the same Python corpus, from the same
initial weights and data order, on the same number of targets: once with --fim-rate 0.9 (the
paper's) and once with 0 (plain next-token prediction; the vocabulary still has the four infilling
tokens, so the two models differ only by the transform). Whole-example placement pads part of each
FIM step (~11% of its tokens at 2,048 with SmolLM2; padding is never a target), so the plain run
stops at the FIM run's target count: its steps are counted beforehand by running both data streams
without a model (equal_target_steps; each run's schedule spans its own steps), and metrics.jsonl's
`targets` shows the sums. The two runs go side by side, one thread each. Then, on files neither
run trained on:

- the autoregressive held-out loss of both (BOS + file + EOS, packed into --seq-len windows): the
  paper found it unchanged by FIM (Table 5: 0.407 vs 0.408 at 7B);
- single-line infilling on held-out functions: each code line of a function's body is masked in
  turn (indentation and line end included, as in HumanEval single-line infilling), in three
  modes (eval.infill_prompt): Code Llama's PSM and SPM prompts, and the prefix alone continued
  left to right, the baseline an AR model can do. Two scores per mode: exact match of the greedy
  middle (generation stops at <EOT>, EOS or the first line end; the first line is compared, blind
  to trailing whitespace: eval.infill_exact), and the loss of the true middle in nats per
  character (comparable across modes, whose tokens differ); and, teacher-forced, the first middle
  token (accuracy of the greedy choice, loss in nats): in PSM the first token is where the model
  must find where the prefix ended, across the suffix. eval.py's own functions score all of it
  (infill_forced, infill_middle), with its token healing in SPM and prefix-only;
- the same for multi-line tasks (a block of 2-4 body lines per function; generation stops after
  as many lines) and random-span tasks (a random character span of the body, as Bavarian et al.
  2022 mask; prefix-only completion cannot know where a span ends and is not generated: "-"),
  --tasks-long of each;
- the paired comparisons, per kind, fixed before anything runs (no mode is picked on the test
  tasks): the FIM model's PSM, and its SPM, each against the same tasks completed from the prefix
  alone by the plain model (and by the --init model as it is, when there is one): exact McNemar
  tests (eval.mcnemar). The evaluation runs in --eval-procs processes, a share of the tasks each.

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

The smallest settings, end to end on a CPU (a minute with the tiny preset; with --init SmolLM2,
below, about 15 min at load average 10):

    python bench/fim_vs_ar.py --out /tmp/fva --corpus STDLIB/email STDLIB/json --vocab-size 500 \
        --steps 3 --seq-len 256 --batch-tokens 512 --micro-batch 2 --warmup 1 --tasks 4 \
        --tasks-long 2 --eval-windows 2 --max-new-tokens 8 --max-new-tokens-long 16

At that size (about 1M training tokens each) the AR losses are within a few percent, but neither
model infills yet (exact match ~0 in every mode). On a GPU machine, with the Python of the
interpreter's site-packages as well (a 200 MB hash-ordered sample, 78M tokens), train there and
evaluate here (the runs' hf/ and metrics.jsonl copied into the same --out are not retrained):

    python bench/fim_vs_ar.py --out OUT --corpus STDLIB SITE_PACKAGES --corpus-mb 200 \
        --steps 6000 --batch-tokens 32768 --micro-batch 128 --warmup 200 --train-only   # GPU
    python bench/fim_vs_ar.py --out OUT --corpus STDLIB SITE_PACKAGES --corpus-mb 200 \
        --steps 6000 --batch-tokens 32768 --micro-batch 128 --warmup 200 \
        --tasks 1000 --eval-windows 512                                               # here

Measured (one H200, both runs side by side, ~0.85M / 1.1M tokens/s; 1,000 held-out tasks). These
tables predate three changes: equal targets (both runs then had the same steps; the FIM run with
--whole-docs, where used, saw fewer targets), token healing (SPM and prefix-only prompts then
ended on the prefix's own last token) and the fixed comparisons (the McNemar line below then set
the FIM model's best mode against the plain model's best, both picked on the test tasks):

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

From a pretrained model, as the paper does (Code Llama continues Llama 2, which can already read
and copy code): --init continues SmolLM2-135M (Llama architecture, 30 layers of 576, 49,152-id
byte-level BPE; the tests' model, dequantized from its 4-bit file) with its own tokenizer, which
train_infill.py extends with the four infilling tokens (added special tokens 49152-49155), on
whole files; infilling examples now lie whole in one context (train_infill.py's default), at
2,048 tokens. SmolLM2 itself, before any training (its new embedding rows at the mean row), is
evaluated as a third row. Prepared for one H200 (9 min at most: ~1 min corpus and tokenizing,
~5 min for the two runs side by side, compiled, four loader workers each, ~2.5 min for 12
evaluation processes). The step count is an estimate (~60-70k tokens/s per run side by side for
a 135M model at 2,048 tokens, compiled), not a measurement: if the first steps log less, lower
--steps for both runs, the same for both:

    python bench/fim_vs_ar.py --out runs/fim-smollm2 --init SMOLLM2 --corpus STDLIB SITE_PACKAGES \
        --corpus-mb 200 --whole-files --seq-len 2048 --steps 240 --batch-tokens 65536 \
        --micro-batch 16 --lr 3e-4 --warmup 24 --compile --loader-workers 4 --tasks 1000 \
        --tasks-long 300 --eval-windows 256 --max-new-tokens 48 --max-new-tokens-long 96 \
        --eval-procs 12

(SMOLLM2: `python -c "import sys; sys.path.insert(0, 'tests'); import gguf_to_hf;
print(gguf_to_hf.cached_conversion())"`; STDLIB and SITE_PACKAGES as above.) Not run yet: no
GPU was available when it was prepared. With SmolLM2's tokenizer, GPT-2's pre-tokenizer joins a
line end to the next line's indentation ("\n   " + " return"), so a line start is not a token
boundary as it is for SentencePiece: SPM and prefix-only prompts are token-healed (eval.py's
infill_prompt; bench/token_boundaries.py measures how often it matters). PSM has no such seam.
bench/fim_humaneval.py is the same experiment for two CPU cores, scored on HumanEval-infilling."""

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

from common import write_atomic  # noqa: E402
from data import IGNORE, prepare, summary  # noqa: E402
from eval import INFILL_MODES as MODES  # noqa: E402
from eval import infill_exact, infill_forced, infill_middle, mcnemar  # noqa: E402
from model import Transformer  # noqa: E402
from sample import load  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

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


def write_corpus(files, path, whole_files=False):
    """One JSONL record per definition-sized piece of each file (or per file)."""
    rows = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        pieces = [text] if whole_files else DEFINITION.split(text)
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


KINDS = ("single", "multi", "span")


def infill_tasks(files, tok, max_tokens):
    """Infilling tasks on every function of `files` that fits in max_tokens, the function's text
    around the middle being prefix and suffix, as HumanEval-infilling's three kinds (Code Llama
    Table 14): "single": each non-empty, non-comment line of its body (docstring left out) in
    turn; "multi": one block of 2 to 4 consecutive body lines per function; "span": one random
    span of the body's characters per function (Bavarian et al.'s random span). Each task's
    random choices are seeded by its place, so the same files give the same tasks anywhere."""
    tasks = {k: [] for k in KINDS}
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
            where, b0, end = f"{f}:{node.lineno}", body[0].lineno - 1, node.end_lineno

            def task(kind, a, b):  # the middle is characters a:b of the function's text
                t = "".join(func)
                return {"kind": kind, "where": where, "prefix": t[:a], "middle": t[a:b],
                        "suffix": t[b:]}
            offsets = [0]
            for line in func:
                offsets.append(offsets[-1] + len(line))
            for i in range(b0, end):
                if lines[i].strip() and not lines[i].strip().startswith("#"):
                    tasks["single"].append(task("single", offsets[i - start],
                                                offsets[i + 1 - start]))
            rng = random.Random(where)
            if end - b0 >= 3:
                k = rng.randint(2, min(4, end - b0 - 1))
                i = rng.randrange(b0, end - k + 1)
                if "".join(lines[i:i + k]).strip():
                    tasks["multi"].append(task("multi", offsets[i - start],
                                               offsets[i + k - start]))
            lo, hi = offsets[b0 - start], offsets[-1]
            a, b = sorted(rng.randint(lo, hi) for _ in range(2))
            if b > a:
                tasks["span"].append(task("span", a, b))
    return tasks


def train_cmd(args, tok_path, corpus, fim_rate, out, steps):
    init = ["--init", str(args.init)] if args.init else ["--init", args.preset,
                                                         "--tokenizer", str(tok_path)]
    return [sys.executable, "train_infill.py", *init,
            "--data", str(corpus), "--out", str(out), "--fim-rate", str(fim_rate),
            "--steps", str(steps), "--seq-len", str(args.seq_len),
            "--batch-tokens", str(args.batch_tokens), "--micro-batch", str(args.micro_batch),
            "--lr", str(args.lr), "--warmup", str(args.warmup),
            "--ckpt-every", str(max(100, steps // 10)), "--eval-every", "0",
            "--dtype", "bf16", "--seed", str(args.seed),
            "--loader-workers", str(args.loader_workers)] + ["--whole-docs"] * args.whole_docs \
        + ["--no-fim-whole-docs"] * (not args.fim_whole_docs) + ["--compile"] * args.compile


def finished(out: Path, steps: int) -> bool:
    """A run whose export is written after its last step (such as one trained on another machine
    and copied here without its checkpoints) is not trained again."""
    metrics = out / "metrics.jsonl"
    return ((out / "hf" / "model.safetensors").exists() and metrics.exists()
            and json.loads(metrics.read_text().splitlines()[-1])["step"] == steps)


def stream_targets(argv, steps=None, until=None):
    """The targets of each step of the data stream that train_infill.py with `argv` trains on, for
    `steps` steps or up to the step whose running sum reaches `until`, counted without a model: the
    stream is a pure function of (data, seed, step) (data.py), built by the engine's functions."""
    import train
    import train_infill
    a = train_infill.parser().parse_args(argv)
    d = train.Dist(0, 1, torch.device("cpu"), None)
    tok, tok_path, transform, _ = train.check_setup(a, train_infill.setup, d)
    batches = train.setup_data(a, tok, tok_path, transform, d)
    counts = []
    while len(counts) < (steps or float("inf")) and sum(counts) < (until or float("inf")):
        counts.append(int((batches.next()[1] != IGNORE).sum()))
    return counts


def steps_to_targets(argv, targets):
    """The number of steps of train_infill.py `argv`'s stream whose targets come nearest to
    `targets` (stream_targets)."""
    counts = stream_targets(argv, until=targets)
    return len(counts) - (sum(counts) - targets > targets - sum(counts[:-1]))


def stream_key(args):
    """The flags that shape both runs' data streams (the same on any machine)."""
    return {k: str(getattr(args, k)) for k in ("steps", "seq_len", "batch_tokens", "seed",
                                               "whole_docs", "fim_whole_docs", "corpus_mb",
                                               "whole_files", "tokenizer", "vocab_size")} | {
        "init": args.init and args.init.name, "corpus": [c.name for c in args.corpus]}


def equal_target_steps(args, tok_path, corpus, runs):
    """Steps of each run such that both train on the same number of targets: --steps for the FIM
    run, whose whole-example placement pads part of each step (its padding is never a target), and
    for the plain run the steps whose targets come nearest to the FIM run's (steps_to_targets; each
    run's schedule spans its own steps). Counted once, kept in OUT/steps.json."""
    path, key = args.out / "steps.json", stream_key(args)
    if path.exists() and json.loads(path.read_text())["key"] == key:
        return json.loads(path.read_text())["steps"]
    argv = lambda name, steps: train_cmd(args, tok_path, corpus, runs[name],  # noqa: E731
                                         args.out / name, steps)[2:]
    fim = sum(stream_targets(argv("fim-0.9", args.steps), steps=args.steps))
    plain = steps_to_targets(argv("fim-0", args.steps), fim)
    steps = {"fim-0.9": args.steps, "fim-0": plain}
    write_atomic(path, json.dumps({"key": key, "steps": steps, "fim_targets": fim}))
    return steps


def train_both(args, tok_path, corpus, runs):
    """The two runs side by side, one thread each (two processes use two busy cores better than
    one process with two threads), each for its equal_target_steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, t0 = {}, time.time()
    steps = equal_target_steps(args, tok_path, corpus, runs)
    for name, rate in runs.items():
        out = args.out / name
        if finished(out, steps[name]):
            continue
        with open(args.out / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(train_cmd(args, tok_path, corpus, rate, out,
                                                     steps[name]), cwd=ROOT,
                                           stdout=log, stderr=subprocess.STDOUT, env=env)
    for name, proc in procs.items():
        if proc.wait():
            sys.exit(f"{name} failed: see {args.out / name}.log")
    stats = {}
    for name in runs:
        rows = [json.loads(x) for x in (args.out / name / "metrics.jsonl").read_text().splitlines()]
        last = rows[-20:]
        stats[name] = {"train_loss_last_20": sum(r["loss"] for r in last) / len(last),
                       "tokens": rows[-1]["tokens"], "steps": rows[-1]["step"],
                       "targets": sum(r["targets"] for r in rows),
                       "train_minutes": (time.time() - t0) / 60 if name in procs else None}
    return stats


@torch.no_grad()
def ar_loss(model, tok, files, seq_len, n_windows):
    """Mean next-token loss on the held-out files, each rendered as a training document (BOS where
    the tokenizer has one, file, EOS), packed into windows."""
    ids = []
    for f in files:
        ids += tok.start_ids + tok.encode(f.read_text(encoding="utf-8", errors="replace"),
                                          eos=True)  # as bos_eos renders a training document
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


def score_task(model, tok, task, mode, max_new_tokens):
    """One task in one mode (eval.INFILL_MODES: PSM, SPM, the prefix alone), with eval.py's own
    functions: teacher-forced, the true middle's loss and its first token apart
    (eval.infill_forced), and the exact match of the greedy middle (eval.infill_middle; token
    healing in SPM and l2r, as eval.py infill does). Generation stops at <EOT> or EOS, and for line
    tasks once it has as many line ends as the middle, whose lines it is compared with; a random
    span's end cannot be told without the suffix, so prefix-only completion of a span is not
    generated (None)."""
    row = {**infill_forced(model, tok, [task], mode, batch=1)[0], "hit": None}
    if task["kind"] == "span" and mode == "l2r":
        return row
    lines = task["middle"].count("\n") if task["kind"] != "span" else 0
    middle = infill_middle(model, tok, task, mode, max_new_tokens, lines=lines)[2]
    row["hit"] = int(infill_exact(middle, task["middle"]))
    return row


def summarize(rows):
    """A mode's scores over its tasks (rows of score_task, in task order)."""
    n = len(rows)
    hits = [r["hit"] for r in rows]
    return {"hits": hits, "exact": None if None in hits else sum(hits) / n,
            "nats_per_char": sum(r["nats"] for r in rows) / sum(r["chars"] for r in rows),
            "first_acc": sum(r["first_hit"] for r in rows) / n,
            "first_loss": sum(r["first_nats"] for r in rows) / n}


def load_model(args, name, device):
    """A trained run's export, or ("untrained") the --init model itself with the embeddings
    grown for the infilling tokens as train_infill.py grows them (new rows at the mean row)."""
    if name != "untrained":
        return load(args.out / name / "hf", device=device)
    tok = Tokenizer.from_pretrained(args.out / "fim-0.9" / "hf")
    model = Transformer.from_pretrained(args.init)
    model.resize_vocab(tok.vocab_size)
    return model.to(device).eval(), tok


def eval_shard(args, name, shard):
    """Worker (--eval-shard NAME:I): shard I of --eval-procs of every kind's tasks, every mode,
    model NAME; plus, in shard 0, its AR held-out loss. Written to OUT/eval/NAME-I.json."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args, name, device)
    held_files = split_files(args.corpus, args.corpus_mb)[1]
    tasks = select_tasks(args, held_files, tok)
    per = max(1, args.eval_procs // args.n_models)
    out = {"tasks": {k: len(v) for k, v in tasks.items()}, "rows": {}}
    for kind, ts in tasks.items():
        limit = args.max_new_tokens if kind == "single" else args.max_new_tokens_long
        for mode in MODES:
            out["rows"][f"{kind}/{mode}"] = [score_task(model, tok, t, mode, limit)
                                             for t in ts[shard::per]]
    if shard == 0:
        out["ar_loss"], out["ar_tokens"] = ar_loss(model, tok, held_files, args.seq_len,
                                                   args.eval_windows)
    path = args.out / "eval" / f"{name}-{shard}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out))


def select_tasks(args, held_files, tok):
    """The tasks evaluated: a seeded sample of each kind (--tasks single-line ones, --tasks-long
    of each of the others), from functions that fit in a --seq-len context with room to write."""
    room = max(args.max_new_tokens, args.max_new_tokens_long) + 8
    tasks = infill_tasks(held_files, tok, args.seq_len - room)
    return {k: random.Random(args.seed).sample(v, min(args.tasks if k == "single"
                                                      else args.tasks_long, len(v)))
            for k, v in tasks.items()}


def evaluate_all(args, names):
    """Every model's shards in parallel processes (single-sequence greedy decoding leaves a GPU
    mostly idle, so several processes share it well), then their rows put back in task order."""
    per = max(1, args.eval_procs // len(names))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for name in names:
        for i in range(per):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--eval-shard", f"{name}:{i}",
                   "--n-models", str(len(names))]
            with open(args.out / f"eval-{name}-{i}.log", "w") as log:
                procs[name, i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                  env=env)
    for (name, i), proc in procs.items():
        if proc.wait():
            sys.exit(f"evaluation of {name} (shard {i}) failed: see "
                     f"{args.out / f'eval-{name}-{i}.log'}")
    results = {}
    for name in names:
        parts = [json.loads((args.out / "eval" / f"{name}-{i}.json").read_text())
                 for i in range(per)]
        r = {"ar_loss": parts[0]["ar_loss"], "ar_tokens": parts[0]["ar_tokens"]}
        for key in parts[0]["rows"]:
            n = sum(len(p["rows"][key]) for p in parts)
            rows = [parts[j % per]["rows"][key][j // per] for j in range(n)]
            r[key] = summarize(rows)
        results[name] = r
    return results, parts[0]["tasks"]


def fmt(x):
    return "-" if x is None else f"{x:.3f}"


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/fim-vs-ar"),
                   help="folder of both runs and the comparison")
    p.add_argument("--corpus", type=Path, nargs="+", default=[STDLIB],
                   help="folders of Python files (default: the standard library)")
    p.add_argument("--corpus-mb", type=float, default=0,
                   help="training text to take from --corpus, a hash-ordered sample (0: all)")
    p.add_argument("--whole-files", action="store_true",
                   help="train on whole files, not files cut at each definition (for long "
                        "contexts, as the paper's documents)")
    p.add_argument("--init", type=Path,
                   help="an HF folder to continue from with its own tokenizer (SmolLM2, as Code "
                        "Llama continues Llama 2), instead of a --preset from scratch; it is "
                        "also evaluated untrained, as a third row")
    p.add_argument("--tokenizer", help="a SentencePiece tokenizer.model to use instead of "
                                       "training one (e.g. Llama 2's); not with --init")
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
    p.add_argument("--fim-whole-docs", action=argparse.BooleanOptionalAction, default=True,
                   help="infilling examples whole in one context (train_infill.py's default)")
    p.add_argument("--compile", action="store_true", help="train with torch.compile")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="batch-building processes per run (train.py --loader-workers)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate")
    p.add_argument("--warmup", type=int, default=40,
                   help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0,
                   help="model init, data order, task sample")
    p.add_argument("--tasks", type=int, default=200, help="single-line tasks evaluated (a seeded "
                                                          "sample of all)")
    p.add_argument("--tasks-long", type=int, default=50,
                   help="multi-line and random-span tasks evaluated, of each")
    p.add_argument("--eval-windows", type=int, default=128,
                   help="held-out windows of --seq-len tokens for the AR loss")
    p.add_argument("--max-new-tokens", type=int, default=48,
                   help="tokens generated per single-line infilling task at most")
    p.add_argument("--max-new-tokens-long", type=int, default=128,
                   help="for multi-line and random-span tasks")
    p.add_argument("--eval-procs", type=int, default=3,
                   help="evaluation processes, split evenly over the models (each takes a share "
                        "of the tasks)")
    p.add_argument("--eval-shard", help=argparse.SUPPRESS)  # NAME:I, for the processes above
    p.add_argument("--n-models", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--train-only", action="store_true",
                   help="stop after training: evaluate later, e.g. on another machine (a finished "
                        "run copied into --out with its hf/ and metrics.jsonl is not retrained)")
    args = p.parse_args()
    args.out = args.out.resolve()
    if args.init and args.tokenizer:
        p.error("--init brings its own tokenizer: drop --tokenizer")
    args.init = args.init.resolve() if args.init else None
    args.corpus = [c.resolve() for c in args.corpus]
    torch.set_num_threads(1)  # on a busy machine one thread beats two (OpenMP barriers wait)
    if args.eval_shard:
        name, shard = args.eval_shard.rsplit(":", 1)
        return eval_shard(args, name, int(shard))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    train_files, held_files = split_files(args.corpus, args.corpus_mb)
    runs = {"fim-0.9": 0.9, "fim-0": 0.0}
    tok_path, prepared = args.out / "tok.model", args.out / "data"
    if args.tokenizer:
        tok_path = Path(args.tokenizer).resolve()
    if args.init:
        tok_path = Tokenizer.from_pretrained(args.init).path
    saved = args.out / "steps.json"
    if not (saved.exists() and all(finished(args.out / name, steps) for name, steps in
                                   json.loads(saved.read_text())["steps"].items())):
        corpus = args.out / "train.jsonl"
        if not corpus.exists():
            n = write_corpus(train_files, corpus, args.whole_files)
            print(f"corpus: {len(train_files)} training files -> {n} documents; "
                  f"{len(held_files)} files held out", flush=True)
        if not tok_path.exists():
            train_tokenizer(train_files, tok_path, args.vocab_size)
        # Tokenized once, by every core, before the two runs (which then read the shards).
        print(f"prepared: {summary(prepare([corpus], tok_path, prepared, shard_mb=4))}",
              flush=True)
    start = args.init or args.preset
    print(f"training {' and '.join(runs)} from {start} side by side, {args.steps} steps of "
          f"{args.batch_tokens} tokens (logs: {args.out}/*.log)", flush=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()},
               "runs": train_both(args, tok_path, prepared, runs)}
    print(json.dumps(results["runs"]), flush=True)
    if args.train_only:
        return

    names = [*runs, *["untrained"] * bool(args.init)]
    t1 = time.time()
    scores, n_tasks = evaluate_all(args, names)
    for name in names:
        results["runs"].setdefault(name, {}).update(scores[name])
    results["tasks"] = n_tasks
    results["eval_minutes"] = (time.time() - t1) / 60
    results["minutes"] = (time.time() - t0) / 60
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    report(results, names)
    print(f"\n{results['eval_minutes']:.1f} min of evaluation, {results['minutes']:.1f} min in "
          f"all; load average {os.getloadavg()[0]:.1f}")


def comparisons(names):
    """The paired comparisons, fixed before anything runs (no mode is picked on the test tasks):
    the FIM model's PSM and its SPM, each against the same tasks completed from the prefix alone by
    the plain continuation, and by the --init model as it is (when there is one)."""
    return [(("fim-0.9", fim), (base, "l2r")) for base in ("fim-0", "untrained")
            if base in names for fim in ("psm", "spm")]


def report(results, names):
    """The tables: AR loss and targets; per kind of task, exact match, middle loss and the first
    middle token per mode; then the fixed paired comparisons (McNemar)."""
    runs, tasks = results["runs"], results["tasks"]
    a, b = runs["fim-0.9"], runs["fim-0"]
    print("\nAR held-out loss: " + ", ".join(f"{n} {runs[n]['ar_loss']:.4f}" for n in names)
          + f" ({a['ar_tokens']:,} tokens); FIM vs not: "
          f"{100 * (a['ar_loss'] / b['ar_loss'] - 1):+.1f}%; training targets (losses summed): "
          f"FIM {a['targets']:,} in {a['steps']} steps, plain {b['targets']:,} in {b['steps']}")
    for kind in KINDS:
        if not tasks[kind]:
            continue
        print(f"\n{kind} ({tasks[kind]} tasks) | exact match PSM / SPM / prefix only | middle "
              "nats/char | first middle token: accuracy | its loss (nats) |")
        print("|---|---|---|---|---|")
        for name in names:
            r = runs[name]
            print(f"| {name} | " + " | ".join(
                " / ".join(fmt(r[f"{kind}/{m}"][k]) for m in MODES)
                for k in ("exact", "nats_per_char", "first_acc", "first_loss")) + " |")
        for (na, ma), (nb, mb) in comparisons(names):
            ha, hb = runs[na][f"{kind}/{ma}"]["hits"], runs[nb][f"{kind}/{mb}"]["hits"]
            if None in ha or None in hb:
                continue
            only_a, only_b, p = mcnemar(ha, hb)
            print(f"paired ({kind}): {na} {ma} {sum(ha) / len(ha):.3f} vs {nb} {mb} "
                  f"{sum(hb) / len(hb):.3f}; right only with the first {only_a}, only with the "
                  f"second {only_b} (McNemar p = {p:.3g})")


if __name__ == "__main__":
    main()
