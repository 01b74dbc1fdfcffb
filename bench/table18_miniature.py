"""Code Llama's Table 18 in miniature: after long-context fine-tuning, does a RoPE base of 1e6 keep
perplexity low past the fine-tuning length where the old base 1e4 does not (sec. 2.4, App. G.1)?

Three tiny-preset models, trained through the real stage scripts on the standard library's Python:
  short     train_code.py at --short-len tokens, base 1e4 (the "Llama 2" of the miniature)
  lcft-1e4  train_longctx.py from `short` at 4x the length, base kept at 1e4
  lcft-1e6  the same run with base 1e6 (Code Llama's choice): same steps, data, seed and LR
then `eval.py ppl` for each on held-out standard-library files at lengths up to 8x --short-len.

    python bench/table18_miniature.py --out runs/table18 [--threads 1]

Writes OUT/table18.md (the table), OUT/table18.json and OUT/table18.png (perplexity vs context
length, one line per model). Finished stages are kept: a re-run only does what is missing.

The data: the standard library's .py files without its tests, split by file (a hash of the path)
into training files and held-out files. The tokenizer: a SentencePiece BPE of --vocab pieces
trained here on the training files, Llama-style (byte fallback, split digits); with Llama 2's 32,000
pieces the tiny preset would spend most of its time in the embedding and output layers, and the
question here is about positions, not vocabulary.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import save_figure, write_atomic  # noqa: E402
STDLIB = Path(os.__file__).parent
MODELS = ("short", "lcft-1e4", "lcft-1e6")


def split_stdlib(out: Path, heldout_percent: int) -> tuple[Path, Path]:
    """train.jsonl and heldout-all.jsonl of the standard library's own Python files, by file."""
    train, held = out / "train.jsonl", out / "heldout-all.jsonl"
    if train.exists() and held.exists():
        return train, held
    parts = {"train": [], "heldout": []}
    for f in sorted(STDLIB.rglob("*.py")):
        rel = f.relative_to(STDLIB)
        if rel.parts[0] == "site-packages" or any("test" in p for p in rel.parts[:-1]):
            continue  # installed packages are not the standard library; tests repeat themselves
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        h = int(hashlib.sha256(str(rel).encode()).hexdigest(), 16) % 100
        parts["heldout" if h < heldout_percent else "train"].append(json.dumps({"text": text}))
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
        minloglevel=2)
    os.replace(out / ".tokenizer.model", path)
    (out / ".tokenizer.vocab").unlink()
    return path


def run(cmd, env, log: Path):
    """A stage's command, its output in a log file; stops the script if it fails."""
    t0 = time.time()
    print("$ " + " ".join(map(str, cmd)), flush=True)
    with open(log, "w") as f:
        r = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, stdout=f,
                           stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}); see {log}:\n" + log.read_text()[-3000:])
    print(f"  done in {time.time() - t0:.0f} s ({log})", flush=True)


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--out", default="runs/table18",
                   help="folder of every run and the table")
    p.add_argument("--short-len", type=int, default=128, help="sequence length of `short`")
    p.add_argument("--short-steps", type=int, default=300,
                   help="steps of `short`")
    p.add_argument("--long-steps", type=int, default=60, help="steps of each fine-tuning run")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per step, every run")
    p.add_argument("--lr", type=float, default=2e-3, help="peak LR of `short`")
    p.add_argument("--long-lr", type=float, default=5e-4, help="peak LR of the fine-tuning runs")
    p.add_argument("--vocab", type=int, default=2048, help="pieces of the trained tokenizer")
    p.add_argument("--heldout-percent", type=int, default=5, help="files held out for the eval")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="evaluated lengths (default: 1, 2, 3, 4, 6 and 8 times --short-len)")
    p.add_argument("--tokens-per-length", type=int, default=32768,
                   help="scored tokens per length and model (eval.py ppl)")
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
    S, L = args.short_len, 4 * args.short_len
    lengths = sorted(set(args.lengths or [S, 2 * S, 3 * S, 4 * S, 6 * S, 8 * S]))
    t0 = time.time()

    train, held = split_stdlib(out, args.heldout_percent)
    tok = train_tokenizer(train, out, args.vocab)
    # Every length is measured on the same files: those holding a window of the longest length
    # (the paper measures on long files too, of at least 50 kB)
    tokenizer = spm.SentencePieceProcessor(model_file=str(tok))
    texts = [json.loads(line)["text"] for line in held.read_text().splitlines()]
    long_files = [t for t in texts if len(tokenizer.encode(t)) + 1 >= max(lengths)]
    held = out / "heldout.jsonl"
    write_atomic(held, "".join(json.dumps({"text": t}) + "\n" for t in long_files))
    common = ["--data", train, "--data-cache", out / "data", "--batch-tokens", args.batch_tokens,
              "--eval-every", "0", "--seed", args.seed, "--dtype", "bf16"]
    if not (out / "short/hf/config.json").exists():
        run([sys.executable, "train_code.py", "--init", "tiny", "--tokenizer", tok, "--base", 1e4,
             "--out", out / "short", "--seq-len", S, "--micro-batch", args.batch_tokens // S,
             "--steps", args.short_steps, "--ckpt-every", args.short_steps, "--lr", args.lr,
             "--warmup", max(1, args.short_steps // 10), *common], env, out / "short.log")
    for base in ("1e4", "1e6"):
        name = f"lcft-{base}"
        if not (out / name / "hf/config.json").exists():
            # at 4x the length the tiny preset's activations are small: no need to recompute them
            run([sys.executable, "train_longctx.py", "--init", out / "short", "--base", base,
                 "--out", out / name, "--seq-len", L, "--micro-batch", args.batch_tokens // L,
                 "--steps", args.long_steps, "--ckpt-every", args.long_steps,
                 "--lr", args.long_lr, "--warmup", max(1, args.long_steps // 10),
                 "--no-activation-checkpointing", *common], env, out / f"{name}.log")
    results = {}
    for name in MODELS:
        ev = out / "eval" / name
        done = json.loads((ev / "ppl.json").read_text()) if (ev / "ppl.json").exists() else {}
        if ([r["length"] for r in done.get("rows", [])] != lengths or
                done.get("tokens_per_length") != args.tokens_per_length):
            run([sys.executable, "eval.py", "ppl", "--ckpt", out / name / "hf", "--data", held,
                 "--min-chars", 0, "--lengths", ",".join(map(str, lengths)),
                 "--tokens-per-length", args.tokens_per_length, "--seed", args.seed,
                 "--out", ev], env, out / f"eval-{name}.log")
        results[name] = json.loads((ev / "ppl.json").read_text())

    ppl = {name: {r["length"]: r["ppl"] for r in results[name]["rows"]} for name in MODELS}
    md = [f"# Table 18 in miniature: perplexity of held-out standard-library files vs context "
          f"length", "",
          f"tiny preset, {args.vocab}-piece BPE; `short` trained {args.short_steps} steps at {S} "
          f"tokens (base 1e4); each LCFT run {args.long_steps} steps at {L} tokens from it; "
          f"{args.batch_tokens} tokens per step; scored: positions [L/2, L) of each window, "
          f"{args.tokens_per_length} tokens per length.", "",
          "| model | rope_theta | trained at | " + " | ".join(f"L={n}" for n in lengths) + " |",
          "|---|---|---|" + "---|" * len(lengths)]
    for name in MODELS:
        cells = [f"{ppl[name][n]:.3f}" if ppl[name].get(n) else "-" for n in lengths]
        md.append(f"| {name} | {results[name]['rope_theta']:g} | {S if name == 'short' else L} | "
                  + " | ".join(cells) + " |")
    # the models share each length's windows: their ratio leaves the text out
    cells = [f"{ppl['lcft-1e6'][n] / ppl['lcft-1e4'][n]:.3f}"
             if ppl["lcft-1e6"].get(n) and ppl["lcft-1e4"].get(n) else "-" for n in lengths]
    md.append("| lcft-1e6 / lcft-1e4 | | | " + " | ".join(cells) + " |")
    far = max(lengths)
    md += ["", "Past the fine-tuning length (perplexity at the longest length / at the fine-tuning "
           "length):"]
    for name in MODELS[1:]:
        md.append(f"- {name}: ppl({far}) / ppl({L}) = {ppl[name][far] / ppl[name][L]:.3f}")
    write_atomic(out / "table18.md", "\n".join(md) + "\n")
    write_atomic(out / "table18.json", json.dumps({"args": vars(args), "lengths": lengths,
                                                   "ppl": ppl}, indent=1) + "\n")
    print("\n".join(md))

    try:
        import matplotlib
    except ImportError:
        sys.exit("no plot: matplotlib is not installed (pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # Left: perplexity. Each length scores other windows (other text), so a curve zigzags with the
    # text; the models share the windows of a length. Right: the same, over lcft-1e4's perplexity
    # on the same windows, which takes the text out and leaves the models' difference.
    fig, (ax, rel) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in zip(MODELS, ("o-", "s-", "^-")):
        xs = [n for n in lengths if ppl[name].get(n) and ppl["lcft-1e4"].get(n)]
        label = f"{name} (theta {results[name]['rope_theta']:g})"
        ax.plot(xs, [ppl[name][n] for n in xs], style, label=label)
        rel.plot(xs, [ppl[name][n] / ppl["lcft-1e4"][n] for n in xs], style, label=label)
    for a in (ax, rel):
        a.axvline(S, color="gray", linestyle=":", label=f"short training length {S}")
        a.axvline(L, color="gray", linestyle="--", label=f"fine-tuning length {L}")
        a.set_xscale("log", base=2)
        a.set_xticks(lengths, [str(n) for n in lengths])
        a.set_xlabel("context length L (tokens)")
    ax.set_ylabel("perplexity of positions [L/2, L)")
    rel.set_ylabel("perplexity / lcft-1e4's on the same windows")
    ax.legend(fontsize=8)
    fig.suptitle("Table 18 in miniature: RoPE base at long-context fine-tuning (held-out stdlib)")
    save_figure(fig, out / "table18.png")
    print(f"wrote {out}/table18.md, table18.json, table18.png ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
