"""Stage 2 of Code Llama 7B and 13B: code training with the infilling objective (sec. 2.3).

The same data, schedule and length as train_code.py, with one change: 90% of the documents that
fit in one context become fill-in-the-middle examples, half PSM and half SPM (data.fim, RECIPE.md
sec. 2), and the model learns to write a middle between a prefix and a suffix at little cost to
ordinary completion (Table 5). 34B and the Python models were trained without it. As in the paper,
an example is never cut across two contexts: each lies whole in one (the rest of the sequence it
does not fit in is padding, whose share each step logs), and a document whose example would not
fit in one is rendered plainly (--no-fim-whole-docs packs examples back to back, for comparisons).

Code Llama added four tokens for this (▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>; 32,000 -> 32,016 ids).
Started from a model whose tokenizer lacks them (Llama 2), this script writes the extended
tokenizer into OUT/tokenizer/ (data.extend_tokenizer: Code Llama's ids; a byte-level BPE such as
SmolLM2's, or a tiktoken file, gets them as added special tokens right after its ids), the engine
grows the embeddings to match (new rows start at the mean row) and the export OUT/hf/ carries the
extended tokenizer. The held-out loss it logs is that of its own objective (the held-out documents
go through the same transform, with fixed split points), so it is not comparable with another
stage's plain next-token loss: bench/fim_vs_ar.py measures that one for FIM and plain runs alike.

One CPU, the tiny preset on the interpreter's own standard library (a few minutes; only files that
fit in one 256-token context become infilling examples, a minority of the library's files:
bench/fim_vs_ar.py cuts them at each definition and compares with plain training):

    python train_infill.py --init tiny --tokenizer ../shared/data/llama2/tokenizer.model \\
        --data "$(python -c 'import os; print(os.path.dirname(os.__file__))')" \\
        --out runs/infill-tiny --steps 300 --seq-len 256 --batch-tokens 8192 --micro-batch 8 \\
        --lr 1e-3 --warmup 30 --ckpt-every 100 --eval-every 100
    python sample.py --ckpt runs/infill-tiny/hf --infill --greedy

Eight GPUs, the paper's settings, from Llama 2 7B (HF layout):

    torchrun --nproc_per_node 8 train_infill.py --init meta-llama/Llama-2-7b-hf \\
        --data data/code data/code_nl data/nl --out runs/infill-7b --activation-checkpointing
"""

import argparse
import os
from pathlib import Path

import train
from data import INFILL_PIECES, Tokenizer, extend_tokenizer, fim
from model import PRESETS
from train_code import DEFAULTS, peak_lr  # stage 2's paper defaults: only the transform differs


def setup(args, tok):
    """The tokenizer with the infilling tokens (extended here when --init's lacks them) and the FIM
    transform."""
    if any(getattr(tok, f"{key}_id") is None for key in INFILL_PIECES):
        # Every process writes the same bytes atomically: no process ever reads a partial file.
        # The tokenizer's config (BOS/EOS names, add_bos) is written beside it.
        path = extend_tokenizer(tok.path, Path(args.out) / "tokenizer" / tok.path.name)
        old, tok = tok, Tokenizer.from_pretrained(path)
        if os.environ.get("RANK", "0") == "0":  # setup runs on every process; one says it
            if args.init in PRESETS:
                grow = f"the preset is built with {tok.vocab_size:,} embeddings"
            elif train.model_args(args).vocab_size < tok.vocab_size:
                grow = (f"the model's embeddings grow from {train.model_args(args).vocab_size:,} "
                        f"to {tok.vocab_size:,} rows (new rows start at the mean row)")
            else:
                grow = f"the model already has {train.model_args(args).vocab_size:,} embeddings"
            ids = "Code Llama's" if tok.kind == "sentencepiece" else "added special tokens"
            print(f"tokenizer: {old.path} lacks the infilling tokens: extended from "
                  f"{old.vocab_size:,} to {tok.vocab_size:,} ids ({ids}) in {path}; {grow}",
                  flush=True)
    return tok, fim(tok, args.seq_len, args.fim_rate, args.spm_rate, args.fim_whole_docs)


def parser():
    p = train.parser(**DEFAULTS)
    p.add_argument("--fim-rate", type=float, default=0.9,
                   help="share of the documents that fit in one context made into infilling "
                        "examples (sec. 2.3)")
    p.add_argument("--spm-rate", type=float, default=0.5,
                   help="share of the infilling examples in the SPM layout, the rest PSM "
                        "(sec. 2.3)")
    p.add_argument("--fim-whole-docs", action=argparse.BooleanOptionalAction, default=True,
                   help="place each infilling example whole in one context, padding the rest of "
                        "the one it does not fit in (sec. 2.3); --no-fim-whole-docs packs them "
                        "back to back, cut at context boundaries like any document (for "
                        "comparisons)")
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    if args.lr is None:
        args.lr = peak_lr(args)
    # the FIM flags shape the data stream too: a resume with other values is refused
    train.run(args, setup, stream_flags=("fim_rate", "spm_rate", "fim_whole_docs"))
