"""Code Llama's Table 18 in miniature: key retrieval after long-context fine-tuning (LCFT) with the
RoPE base kept, raised 100x, or with linear position interpolation instead (sec. 3.3, App. G.2).

Table 18 ablates the base change on an earlier 7B, every LCFT run at 16,384 tokens, and scores
synthetic key retrieval (a function returning a two-digit number hidden in code, asked for at the
end) at 8K, 16K and 24K. Its four findings:
  1. before LCFT, retrieval works only within the pretraining length (4K), with base 1e4 or 1e6
     (raising the base at inference alone does nothing);
  2. LCFT with base 1e4 fails already at 8K, twice the pretraining length;
  3. linear frequency scaling by 1/4 (Chen et al. 2023, "Extending context window of large language
     models via positional interpolation") works to 8K, is poor at 16K with the key at position 0,
     fails at 24K;
  4. base 1e6, the released model, retrieves up to 16K and partly at 24K (Table 17's 7B row).

The miniature, through the real stage scripts, on Python code (--corpus):
  short         train_code.py at L tokens with base b (the "Llama 2" of the miniature), first
                checked to retrieve within L (at L/2 and L: at least 80% is asked)
  short-100b    the same weights evaluated with base 100b, no fine-tuning
  lcft-b        train_longctx.py from `short` at 4L tokens, base b
  lcft-100b     the same with base 100b (Code Llama's change)
  lcft-linear   the same with base b and positions divided by 4 (--rope-scale 4)
The three LCFT runs have the same steps, data, seed and LR. Then `eval.py retrieval` for each
over lengths L, 2L, 4L, 6L (the paper's 4K, 8K, 16K, 24K) and key positions 0, 0.2, ..., 0.8
(--samples per cell; the paper: 64), and `eval.py ppl` over the same lengths (the second panel).

Geometry. Dimension pair i of RoPE turns by p * b^(-2i/d) over a distance p. At 1/8 of the paper's
lengths (L = 512 for 4,096) the literal bases leave the slow pairs nearly still, as a much larger
base would at the paper's lengths; scaling the bases with the lengths nearly keeps the slow
pairs' angles over the pretraining length: b = 1e4 * L / 4096 (1,250 at L = 512) and 100b (125,000).
--geometry literal runs 1e4 and 1e6 instead, as a second arm.

Data. The Python files of --corpus (the standard library by default), split by file: held-out
files (one in 20, by a hash of the path) are the haystacks of the retrieval prompts and the
perplexity texts; the others are training data. LCFT trains on plain code (the paper's LCFT data
is code, whose natural long-range lookups keep a 7B model's retrieval exercised), or with
--lcft-kv-share on code and key-value documents of up to 4L, the same for the three runs: a model
of a few million parameters that learnt retrieval from synthetic documents alone may otherwise
lose it to plain code, and the grid would measure forgetting, not the RoPE change.
`short` may get a share of synthetic key-value documents (--kv-share, default 10% of its
sequences): training code with 2 to 6 `def NAME() -> int:` functions of two-digit values inserted
(other names than the evaluation's `my_function`, other docstrings), each asked once by
`assert NAME() == VALUE` somewhere after it: many lookups per sequence, near and far, for the
copying to be learnt from (induction heads, Olsson et al. 2022, form on repeated tokens). The
paper's question is whether retrieval carries to longer contexts after LCFT, not whether it
emerges from code alone in a few minutes of training; --kv-share 0 trains on code alone. The
tokenizer: a SentencePiece BPE of --vocab pieces trained here, Llama-style (byte fallback, split
digits).

Steps: --short-steps and --long-steps, or --train-seconds, which sizes both by a probe (a short
run of `short`'s settings, its tokens/s): 60% of the seconds for `short`, 40% for the three LCFT
runs, whose tokens/s is the probe's scaled by the FLOPs per token at 4L (train.flops_per_token).
Finished stages are kept: a re-run does only what is missing (delete a stage's folder, and those
of the stages after it, to redo it).

Writes OUT/table18.md (the grid laid out as Tables 17/18, the perplexities, the findings computed
from the numbers), OUT/table18.json and OUT/table18.png (a retrieval heatmap per model, and
perplexity vs length).

CPU, the run the README reports (tiny preset, L = 256, 18.4M tokens for `short`, 80% of its
sequences and of the LCFT runs' key-value documents; 30 minutes alone on 2 quiet cores: `short`
retrieves 100% within L from 11M tokens on):

    python bench/table18_miniature.py --out runs/table18-cpu --preset tiny --short-len 256 \\
        --short-steps 4500 --long-steps 100 --batch-tokens 4096 --vocab 1024 --samples 32 \\
        --kv-share 0.8 --lcft-kv-share 0.8 --lr 3e-3 --threads 2

One H200, at most 9 minutes, bringing back only the tables and the figure (mini preset, L = 512,
the standard library and a 100 MB sample of site-packages, steps sized by the probe for 240 s of
training; the rest is the corpus and tokenizer, compilation and the evaluations, run side by side;
if the stage times it prints leave no margin, lower --train-seconds):

    python bench/table18_miniature.py --out /tmp/t18 --preset mini --short-len 512 \\
        --corpus "$(python -c 'import os; print(os.path.dirname(os.__file__))')" \\
        "$(python -c 'import site; print(site.getsitepackages()[0])')" --corpus-mb 100 \\
        --train-seconds 240 --batch-tokens 65536 --compile && cp /tmp/t18/table18.* "$OUT"/
"""

import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import sentencepiece as spm
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import pyplot, save_figure, write_atomic  # noqa: E402
from eval import (PROMPT_END, Haystacks, greedy_completion, haystack_files,  # noqa: E402
                  read_texts, retrieval_grid)
from model import ModelArgs, Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from train import complete_checkpoints, flops_per_token  # noqa: E402

STDLIB = Path(os.__file__).parent
POSITIONS = (0.0, 0.2, 0.4, 0.6, 0.8)  # Table 17 shows 0, 0.2, 0.4; Fig. 4b runs to 1.0
MODELS = ("short", "short-100b", "lcft-b", "lcft-100b", "lcft-linear")
SHORT_SHARE = 0.6  # of --train-seconds: `short`; the rest is shared by the three LCFT runs
WORKS, POOR, FAILS = 0.8, 0.5, 0.2  # mean accuracy over positions: "works", "poor", "fails"
CHECK_SAMPLES = 64  # prompts per cell of the check within L (the paper's per cell)
EMERGENCE_POINTS = 10  # checkpoints of `short` whose retrieval within L is measured
EMERGENCE_SAMPLES = 8  # prompts per key position and length at each of them

# Synthetic key-value documents: names, docstrings and values unlike the evaluation's
VERBS = ("get", "compute", "load", "read", "find", "count", "fetch", "make", "parse", "check",
         "default", "max", "min", "base", "next", "last", "first", "total", "new", "old")
NOUNS = ("value", "limit", "size", "total", "index", "offset", "level", "score", "width", "port",
         "height", "depth", "count", "number", "version", "code", "rate", "step", "mode", "id")
NAMES = [f"{v}_{n}" for v in VERBS for n in NOUNS if v != n] + [
    f"_{v}_{n}" for v in VERBS for n in NOUNS if v != n]
assert "my_function" not in NAMES and not any(f"{n}()" in PROMPT_END for n in NAMES)
DOCSTRINGS = ("", '    """The configured value."""\n', '    """Checked below."""\n',
              "    # fixed by the caller\n")


def split_corpus(out: Path, roots: list, heldout_percent: int, max_mb: float) -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl of the Python files under `roots`, split by file (a hash of
    its path inside its root, so the same file is held out on any machine). Training files are
    taken in the order of that hash up to max_mb (0: all), held-out ones up to their share of it:
    a capped corpus is a random sample."""
    train, held = out / "train.jsonl", out / "heldout.jsonl"
    if train.exists() and held.exists():
        return train, held
    files = []
    for root in map(Path, roots):
        for f in root.rglob("*.py"):
            rel = f.relative_to(root)
            # installed packages are not the standard library; tests repeat themselves
            if (root == STDLIB and rel.parts[0] == "site-packages") or \
                    any("test" in p for p in rel.parts[:-1]):
                continue
            files.append((hashlib.sha256(str(rel).encode()).hexdigest(), f))
    parts, size = {"train": [], "heldout": []}, {"train": 0, "heldout": 0}
    cap = {"train": max_mb * 2**20, "heldout": max_mb * 2**20 * heldout_percent / 100}
    for h, f in sorted(files):
        part = "heldout" if int(h, 16) % 100 < heldout_percent else "train"
        if max_mb and size[part] >= cap[part]:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts[part].append(json.dumps({"text": text}))
        size[part] += len(text)
    for name, path in (("train", train), ("heldout", held)):
        write_atomic(path, "\n".join(parts[name]) + "\n")
    return train, held


def train_tokenizer(train: Path, out: Path, vocab: int) -> Path:
    path = out / "tokenizer.model"
    if path.exists():
        return path
    lines = [line for rec in train.read_text().splitlines()
             for line in json.loads(rec)["text"].splitlines()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines[::4]), model_prefix=str(out / ".tokenizer"),
        vocab_size=vocab, model_type="bpe", normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, byte_fallback=True,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        input_sentence_size=1_000_000, shuffle_input_sentence=True, minloglevel=2)
    os.replace(out / ".tokenizer.model", path)
    (out / ".tokenizer.vocab").unlink()
    return path


# --------------------------------------------------------------------------------------------------
# Synthetic key-value documents for `short`


def keyvalue_doc(rng: random.Random, files: list, chars: int) -> str:
    """Training code of about `chars` characters (short top-level statements of random files), a
    few of them repeated further on (plain copying, as induction heads learn it: Olsson et al.
    2022), holding 2 to 6 key functions of two-digit values at random statement boundaries, each
    asked once by `assert NAME() == VALUE` somewhere after it (a lookup over a random distance,
    as the evaluation's is over a random position)."""
    pieces = []
    while sum(map(len, pieces)) < chars:
        f = rng.choice(files)
        k = rng.randrange(len(f))
        pieces += [x if x.endswith("\n") else x + "\n" for x in f[k:k + rng.randint(1, 4)]
                   if len(x) < chars / 4]  # many short pieces: the keys spread over the document
    for _ in range(rng.randint(1, 3) if len(pieces) > 1 else 0):
        k = rng.randrange(len(pieces) - 1)
        pieces.insert(rng.randint(k + 1, len(pieces)), pieces[k])
    for name in rng.sample(NAMES, rng.randint(2, 6)):
        value = rng.randint(10, 99)  # two digits, as the evaluation's (App. G.2)
        at = rng.randint(0, len(pieces))
        pieces.insert(rng.randint(at, len(pieces)), f"assert {name}() == {value}\n")
        pieces.insert(at, f"def {name}() -> int:\n{rng.choice(DOCSTRINGS)}"
                      f"    return {value}\n\n\n")
    return "".join(pieces)


def write_keyvalue(out: Path, train: Path, tok_path: Path, seq_len: int, n_docs: int,
                   seed: int) -> Path:
    """n_docs synthetic documents: code of 1/8 to 1/2 of seq_len tokens and the keys (~100
    tokens), most within one sequence (a key cut off from its question teaches nothing)."""
    path = out / f"keyvalue-{seq_len}-{n_docs}.jsonl"
    if path.exists():
        return path
    rng = random.Random(seed)
    texts = train.read_text().splitlines()
    texts = [json.loads(t)["text"] for t in rng.sample(texts, min(len(texts), 400))]
    files = haystack_files(texts)
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    sample = "".join(texts[:50])
    chars_per_token = len(sample) / len(sp.encode(sample))
    docs = [keyvalue_doc(rng, files, int(rng.uniform(seq_len / 8, seq_len / 2)
                                         * chars_per_token)) for _ in range(n_docs)]
    write_atomic(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


# --------------------------------------------------------------------------------------------------
# Running the stages


def run_all(cmds: dict, env, out: Path, jobs: int):
    """Run {name: command} with at most `jobs` at once, each one's output in OUT/logs/NAME.log;
    stops the script if one fails."""
    (out / "logs").mkdir(exist_ok=True)
    pending, running, t0 = list(cmds.items()), {}, time.time()
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd = pending.pop(0)
            print("$ " + " ".join(map(str, cmd)), flush=True)
            log = open(out / "logs" / f"{name}.log", "w")
            running[name] = (subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env, stdout=log,
                                              stderr=subprocess.STDOUT), log)
        time.sleep(0.5)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            text = (out / "logs" / f"{name}.log").read_text()
            if proc.returncode:
                for other, _ in running.values():
                    other.kill()
                sys.exit(f"{name} failed ({proc.returncode}); see {out}/logs/{name}.log:\n"
                         + text[-3000:])
            print(f"  {name} done at {time.time() - t0:.0f} s", flush=True)


def tokens_per_s(run_dir: Path) -> float:
    """Median tokens/s of a training run's steps after the first two (warm-up, compilation)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = sorted(r["tokens_per_s"] for r in rows[2:]) or [rows[-1]["tokens_per_s"]]
    return speeds[len(speeds) // 2]


def plan_steps(args, tps: float, margs: ModelArgs, L: int) -> tuple[int, int]:
    """Steps of `short` and of each LCFT run that fill --train-seconds at the probe's speed."""
    short = SHORT_SHARE * args.train_seconds * tps / args.batch_tokens
    long_tps = tps * flops_per_token(margs, L) / flops_per_token(margs, 4 * L)
    long = (1 - SHORT_SHARE) / 3 * args.train_seconds * long_tps / args.batch_tokens
    return max(1, int(short)), max(1, int(long))


def emergence(run: Path, margs: ModelArgs, tok_path: Path, held: Path, L: int,
              seed: int) -> list[dict]:
    """Retrieval of each kept checkpoint of a run at L/2 and L (EMERGENCE_SAMPLES prompts per
    key position, the check's haystacks): how the skill appears over the steps. margs: the run's
    architecture (its preset, the tokenizer's vocabulary, base b); works while the run trains."""
    tok = Tokenizer.from_pretrained(tok_path)
    margs = replace(margs, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
    model = Transformer(margs).eval()
    haystacks = Haystacks(tok, haystack_files(read_texts(held, {".py": "python"})))
    complete = greedy_completion(model, tok, max_new_tokens=6)
    rows = []
    for ckpt in complete_checkpoints(run):
        state = {"model": get_model_state_dict(model)}
        with warnings.catch_warnings():  # one process: no process group, as train.py loads
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=ckpt, no_dist=True)
        set_model_state_dict(model, state["model"])
        cells, _ = retrieval_grid(haystacks, [L // 2, L], POSITIONS, EMERGENCE_SAMPLES, seed,
                                  complete)
        acc = {(c["length"], c["position"]): c["accuracy"] for c in cells}
        step = json.loads((ckpt / "train_state.json").read_text())["step"]
        rows.append({"step": step, "at_half_L": mean_at(acc, L // 2), "at_L": mean_at(acc, L)})
        print(f"emergence: step {step}: {rows[-1]['at_half_L']:.0%} at L/2, "
              f"{rows[-1]['at_L']:.0%} at L", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# The report: Tables 17/18's layout and the four findings, computed from the grid


def mean_at(acc: dict, length: int) -> float:
    """Mean accuracy over the positions of one length; acc: {(length, position): accuracy}."""
    cells = [a for (n, _), a in acc.items() if n == length]
    return sum(cells) / len(cells)


def findings(grid: dict, L: int) -> list[tuple[str, bool, str]]:
    """Which of Table 18's findings the grid shows: (finding, reproduced, the numbers that decide).
    grid: {model: {(length, position): accuracy}} over lengths L, 2L, 4L, 6L; "works" is a mean
    over positions of at least WORKS, "poor" below POOR, "fails" below FAILS, "some" at least
    FAILS. A model "fails at kL" only if it works at L: one that retrieves nowhere (untrained, or
    whose fine-tuning erased what `short` learnt) says nothing about lengths."""
    def m(model, k):
        return mean_at(grid[model], k * L)

    def works(model, k):
        return m(model, k) >= WORKS

    def fails(model, k):
        return works(model, 1) and m(model, k) < FAILS

    def fmt(model, *ks):
        return ", ".join(f"{model} {k}L {m(model, k):.0%}" for k in ks)

    lin, at0 = "lcft-linear", grid["lcft-linear"][4 * L, 0.0]
    return [
        # sec. 3.3 / Table 18: "works only within 4K", with base 1e4 or 1e6 at inference
        ("before LCFT, retrieval works within L and fails beyond, with base b or 100b",
         all(fails(s, k) for s in ("short", "short-100b") for k in (2, 4, 6)),
         f"{fmt('short', 1, 2, 4, 6)}; {fmt('short-100b', 1, 2, 4, 6)}"),
        ("LCFT with base b works at L and fails at 2L", fails("lcft-b", 2), fmt("lcft-b", 1, 2)),
        ("linear scaling 1/4 works to 2L, is poor at 4L with the key at position 0, fails at 6L",
         works(lin, 2) and works(lin, 1) and at0 < POOR and fails(lin, 6),
         f"{fmt(lin, 1, 2)}, 4L position 0 {at0:.0%}, {fmt(lin, 6)}"),
        # Table 17's 7B row: works at 8K and 16K (means 98% and 84%), partly at 24K (58%)
        ("base 100b works up to 4L and at least partly at 6L",
         all(works("lcft-100b", k) for k in (1, 2, 4)) and m("lcft-100b", 6) >= FAILS,
         fmt("lcft-100b", 1, 2, 4, 6)),
    ]


def grid_table(grid: dict, about: dict, L: int, positions) -> list[str]:
    """Markdown rows in Table 17's layout: a model per row, a length per column, each cell the
    accuracy (%) at every key position, separated by slashes."""
    lengths = [k * L for k in (1, 2, 4, 6)]
    md = ["| model | rope_theta | positions / | " + " | ".join(
              f"{n} ({k}L)" for n, k in zip(lengths, (1, 2, 4, 6))) + " |",
          "|---|---|---|" + "---|" * len(lengths)]
    for name, acc in grid.items():
        cells = [" / ".join(f"{100 * acc[n, p]:.1f}" for p in positions) for n in lengths]
        md.append(f"| {name} | {about[name]['rope_theta']:g} | {about[name]['rope_scale']:g} | "
                  + " | ".join(cells) + " |")
    return md


def plot(out: Path, grid: dict, ppl: dict, about: dict, L: int, positions):
    plt = pyplot()
    if plt is None:
        return
    lengths = [k * L for k in (1, 2, 4, 6)]
    fig = plt.figure(figsize=(3.2 * len(grid), 7.5))
    gs = fig.add_gridspec(2, len(grid), height_ratios=[1, 1.1], hspace=0.45)
    for i, (name, acc) in enumerate(grid.items()):
        ax = fig.add_subplot(gs[0, i])
        cells = [[acc[n, p] for p in positions] for n in lengths]
        ax.imshow(cells, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for r, row in enumerate(cells):
            for c, a in enumerate(row):
                ax.text(c, r, f"{100 * a:.0f}", ha="center", va="center", fontsize=8,
                        color="black" if a > 0.5 else "white")
        ax.set_xticks(range(len(positions)), [f"{p:g}" for p in positions])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths] if i == 0 else [])
        ax.set_xlabel("key position")
        if i == 0:
            ax.set_ylabel("context length (tokens)")
        scale = about[name]["rope_scale"]
        ax.set_title(f"{name}\nbase {about[name]['rope_theta']:g}"
                     + (f", positions / {scale:g}" if scale != 1 else ""), fontsize=9)
    ax = fig.add_subplot(gs[1, :])
    for name, rows in ppl.items():
        xs = [n for n in lengths if rows.get(n)]
        ax.plot(xs, [rows[n] for n in xs], "o-", label=name)
    ax.axvline(L, color="gray", linestyle=":", label=f"pretraining length {L}")
    ax.axvline(4 * L, color="gray", linestyle="--", label=f"fine-tuning length {4 * L}")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity of positions [n/2, n)")
    ax.legend(fontsize=8)
    fig.suptitle("Table 18 in miniature: key retrieval accuracy (%) by length and key position; "
                 "held-out perplexity")
    save_figure(fig, out / "table18.png")
    plt.close(fig)


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--out", default="runs/table18", help="folder of every run and the table")
    p.add_argument("--preset", default="mini", help="model.py preset of `short`")
    p.add_argument("--short-len", type=int, default=512,
                   help="L, `short`'s sequence length (the paper's 4,096 / 8); LCFT runs at 4L")
    p.add_argument("--geometry", choices=["scaled", "literal"], default="scaled",
                   help="scaled: b = 1e4 * L / 4096 (1,250 at L = 512); literal: b = 1e4; "
                        "the LCFT base is 100b either way")
    p.add_argument("--short-steps", type=int, default=2000, help="steps of `short`")
    p.add_argument("--long-steps", type=int, default=200, help="steps of each LCFT run")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="size --short-steps and --long-steps by a probe to fill this many seconds "
                        "of training (compilation and evaluation not included)")
    p.add_argument("--probe-steps", type=int, default=20, help="steps of the --train-seconds probe")
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens per step, every run")
    p.add_argument("--lr", type=float, default=1e-3, help="peak LR of `short`")
    p.add_argument("--long-lr", type=float, default=3e-4, help="peak LR of the LCFT runs")
    p.add_argument("--kv-share", type=float, default=0.1,
                   help="share of `short`'s sequences drawn from synthetic key-value documents "
                        "(0: code alone)")
    p.add_argument("--lcft-kv-share", type=float, default=0.0,
                   help="the same for each LCFT run, its documents as long as 4L (0: plain code, "
                        "as the paper's LCFT data)")
    p.add_argument("--vocab", type=int, default=2048, help="pieces of the trained tokenizer")
    p.add_argument("--corpus", nargs="+", default=[str(STDLIB)],
                   help="folders of Python files (default: the standard library, tests left out)")
    p.add_argument("--corpus-mb", type=float, default=0,
                   help="at most this many MB of training files, a hash-ordered sample (0: all)")
    p.add_argument("--heldout-percent", type=int, default=5, help="files held out for the eval")
    p.add_argument("--samples", type=int, default=64, help="retrieval prompts per cell")
    p.add_argument("--tokens-per-length", type=int, default=32768,
                   help="scored tokens per length and model (eval.py ppl)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training runs")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs side by side in the LCFT and evaluation stages (default: all on a "
                        "GPU, which one-prompt decoding leaves mostly idle; 1 on a CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the runs (default: torch's choice); on a busy "
                        "machine 1 thread per process can be several times faster than 2")
    p.add_argument("--seed", type=int, default=0,
                   help="model init and data order")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)  # this process's own evaluation (emergence)
    jobs = args.jobs or (16 if torch.cuda.is_available() else 1)
    L = args.short_len
    if L < 256:  # the key function and the question take ~50 tokens: at L/2 most must be code
        sys.exit(f"error: --short-len {L}: at least 256, so that the check's L/2-token prompts "
                 "are mostly haystack")
    b = 1e4 * L / 4096 if args.geometry == "scaled" else 1e4
    lengths = [L, 2 * L, 4 * L, 6 * L]
    t0 = time.time()

    train, held = split_corpus(out, args.corpus, args.heldout_percent, args.corpus_mb)
    tok = train_tokenizer(train, out, args.vocab)
    margs = ModelArgs.from_name(args.preset, vocab_size=args.vocab)
    common = ["--batch-tokens", args.batch_tokens, "--eval-every", "0", "--seed", args.seed,
              "--dtype", "bf16", "--data-cache", out / "data"] + (["--compile"] * args.compile)
    short_cmd = [sys.executable, "train_code.py", "--init", args.preset, "--tokenizer", tok,
                 "--base", b, "--seq-len", L, "--micro-batch", args.batch_tokens // L,
                 "--lr", args.lr, *common]

    steps = {"short": args.short_steps, "long": args.long_steps, "tokens_per_s": None}
    if args.train_seconds:
        probe = out / "probe.json"
        if not probe.exists():
            run_all({"probe": short_cmd + ["--data", train, "--out", out / "probe", "--steps",
                                           args.probe_steps, "--warmup", args.probe_steps,
                                           "--ckpt-every", args.probe_steps]}, env, out, 1)
            tps = tokens_per_s(out / "probe")
            short, long = plan_steps(args, tps, margs, L)
            write_atomic(probe, json.dumps({"tokens_per_s": tps, "short": short, "long": long}))
        steps = json.loads(probe.read_text())
        print(f"probe: {steps['tokens_per_s']:,.0f} tokens/s at {L} tokens: `short` "
              f"{steps['short']} steps, each LCFT run {steps['long']} steps", flush=True)
    S, LS = steps["short"], steps["long"]

    # `short`: code, and a share of synthetic key-value documents (sized to the planned steps)
    data = ["--data", train]
    if args.kv_share > 0:
        n_docs = math.ceil(args.kv_share * S * args.batch_tokens / (0.5 * L))
        kv = write_keyvalue(out, train, tok, L, min(n_docs, 50_000), args.seed)
        data = ["--data", f"{train}:{1 - args.kv_share}", f"{kv}:{args.kv_share}"]
    if not (out / "short/hf/config.json").exists():
        run_all({"short": short_cmd + [*data, "--out", out / "short", "--steps", S,
                                       "--warmup", max(1, S // 10),
                                       # the checkpoints the emergence curve is measured on
                                       "--ckpt-every", max(1, S // EMERGENCE_POINTS),
                                       "--keep-ckpts", EMERGENCE_POINTS + 1]},
                env, out, 1)

    curve = out / "eval/emergence.json"
    if not curve.exists():
        margs_short = replace(margs, rope_theta=b)
        write_atomic(curve, json.dumps(emergence(out / "short", margs_short, tok, held, L,
                                                 args.seed), indent=1) + "\n")
    emerged = json.loads(curve.read_text())

    # the check (does `short` retrieve within L?) and the three LCFT runs, side by side
    retrieval = [sys.executable, "eval.py", "retrieval", "--data", held,
                 "--positions", ",".join(f"{x:g}" for x in POSITIONS), "--seed", args.seed]
    cmds = {}
    if not (out / "eval/check/retrieval.json").exists():
        cmds["check"] = retrieval + ["--ckpt", out / "short/hf", "--lengths", f"{L // 2},{L}",
                                     "--samples", CHECK_SAMPLES, "--out", out / "eval/check"]
    long_data = ["--data", train]
    if args.lcft_kv_share > 0:  # the same documents for the three runs
        n_docs = math.ceil(args.lcft_kv_share * LS * args.batch_tokens / (2 * L))
        kv = write_keyvalue(out, train, tok, 4 * L, min(n_docs, 50_000), args.seed)
        long_data = ["--data", f"{train}:{1 - args.lcft_kv_share}", f"{kv}:{args.lcft_kv_share}"]
    lcft = {"lcft-b": ["--base", b], "lcft-100b": ["--base", 100 * b],
            "lcft-linear": ["--base", b, "--rope-scale", 4]}
    for name, rope in lcft.items():
        if not (out / name / "hf/config.json").exists():
            # the miniature's activations are small: no need to recompute them
            cmds[name] = [sys.executable, "train_longctx.py", "--init", out / "short", *rope,
                          *long_data, "--out", out / name, "--seq-len", 4 * L,
                          "--micro-batch", args.batch_tokens // (4 * L), "--steps", LS,
                          "--ckpt-every", LS, "--lr", args.long_lr,
                          "--warmup", max(1, LS // 10), "--no-activation-checkpointing", *common]
    run_all(cmds, env, out, jobs)

    # retrieval and perplexity of every model, over L, 2L, 4L, 6L
    ckpts = {"short": [out / "short/hf"], "short-100b": [out / "short/hf", "--base", 100 * b],
             **{name: [out / name / "hf"] for name in lcft}}
    cmds = {}
    for name, ckpt in ckpts.items():
        ev = out / "eval" / name
        if not (ev / "retrieval.json").exists():
            cmds[f"retrieval-{name}"] = retrieval + [
                "--ckpt", *ckpt, "--lengths", ",".join(map(str, lengths)),
                "--samples", args.samples, "--out", ev]
        if not (ev / "ppl.json").exists():
            cmds[f"ppl-{name}"] = [sys.executable, "eval.py", "ppl", "--ckpt", *ckpt,
                                   "--data", held, "--min-chars", 0,
                                   "--lengths", ",".join(map(str, lengths)),
                                   "--tokens-per-length", args.tokens_per_length,
                                   "--seed", args.seed, "--out", ev]
    run_all(cmds, env, out, jobs)

    grid, ppl, about = {}, {}, {}
    for name in MODELS:
        r = json.loads((out / "eval" / name / "retrieval.json").read_text())
        grid[name] = {(c["length"], c["position"]): c["accuracy"] for c in r["cells"]}
        about[name] = {"rope_theta": r["rope_theta"], "rope_scale": r.get("rope_scale", 1.0)}
        pr = json.loads((out / "eval" / name / "ppl.json").read_text())
        ppl[name] = {row["length"]: row["ppl"] for row in pr["rows"]}
    cells = json.loads((out / "eval/check/retrieval.json").read_text())["cells"]
    check_grid = {(c["length"], c["position"]): c["accuracy"] for c in cells}
    check = {n: mean_at(check_grid, n) for n in (L // 2, L)}
    ok = min(check.values()) >= WORKS
    table = findings(grid, L)
    kv = (f"{args.kv_share:.0%} of its sequences synthetic key-value documents (other names "
          "than the evaluation's)" if args.kv_share > 0 else "code alone")
    long_kv = (f"code and {args.lcft_kv_share:.0%} key-value documents of up to 4L"
               if args.lcft_kv_share > 0 else "plain code")
    md = ["# Table 18 in miniature: key retrieval after long-context fine-tuning", "",
          f"{args.preset} preset, {args.vocab}-piece BPE, {args.geometry} geometry (b = {b:g}, "
          f"100b = {100 * b:g}); `short`: {S} steps of {args.batch_tokens} tokens at L = {L}, "
          f"LR {args.lr:g}, {kv}; each LCFT run: {LS} steps at {4 * L} tokens, {long_kv}, "
          f"LR {args.long_lr:g}; {args.samples} prompts per cell, haystacks of held-out files"
          + (f"; steps sized by a probe ({steps['tokens_per_s']:,.0f} tokens/s) for "
             f"{args.train_seconds:g} s of training" if steps["tokens_per_s"] else "") + ".", "",
          f"`short` retrieves within L (mean over positions at L/2 = {L // 2}: "
          f"{check[L // 2]:.0%}, at L: {check[L]:.0%}; {CHECK_SAMPLES} prompts per cell, "
          f"{WORKS:.0%} asked): "
          + ("yes" if ok else "NO, so the findings below say little"), "",
          f"Retrieval within L over `short`'s training (mean over key positions, "
          f"{EMERGENCE_SAMPLES} prompts per position):", "",
          "| step | " + " | ".join(str(r["step"]) for r in emerged) + " |",
          "|---|" + "---|" * len(emerged),
          f"| L/2 = {L // 2} | " + " | ".join(f"{r['at_half_L']:.0%}" for r in emerged) + " |",
          f"| L = {L} | " + " | ".join(f"{r['at_L']:.0%}" for r in emerged) + " |", "",
          "Accuracy (%) at key positions " + " / ".join(f"{x:g}" for x in POSITIONS)
          + " (Table 17's layout; `positions /` is the linear scaling factor):", "",
          *grid_table(grid, about, L, POSITIONS), "",
          "Perplexity of held-out files, positions [n/2, n) of n-token windows (the second "
          "panel):", "",
          "| model | " + " | ".join(str(n) for n in lengths) + " |",
          "|---|" + "---|" * len(lengths)]
    md += [f"| {name} | " + " | ".join(f"{ppl[name][n]:.3f}" if ppl[name].get(n) else "-"
                                       for n in lengths) + " |" for name in MODELS]
    md += ["", f"The paper's findings (works: mean over positions >= {WORKS:.0%}, poor: < "
           f"{POOR:.0%}, fails: < {FAILS:.0%}, some: >= {FAILS:.0%}):", ""]
    # without retrieval within L, "fails further out" holds trivially and says nothing
    md += [f"- {('reproduced' if yes else 'NOT reproduced') if ok else 'no test'}: {text} "
           f"({numbers})" for text, yes, numbers in table]
    write_atomic(out / "table18.md", "\n".join(md) + "\n")
    write_atomic(out / "table18.json", json.dumps({
        "args": vars(args), "b": b, "short_steps": S, "long_steps": LS,
        "tokens_per_s": steps["tokens_per_s"], "check": check, "positions": POSITIONS,
        "lengths": lengths, "models": about,
        "accuracy": {name: [[acc[n, x] for x in POSITIONS] for n in lengths]
                     for name, acc in grid.items()},
        "ppl": ppl, "short_retrieves_within_L": ok, "emergence": emerged,
        "findings": [{"finding": t, "reproduced": y, "numbers": s} for t, y, s in table]},
        indent=1) + "\n")
    print("\n".join(md))
    plot(out, grid, ppl, about, L, POSITIONS)
    print(f"wrote {out}/table18.md, table18.json, table18.png ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
