"""Stage 2 of Code Llama 7B and 13B: code training with the infilling objective (sec. 2.3).

The same data, schedule and length as train_code.py, with one change: 90% of the documents that
fit in one context become fill-in-the-middle examples, half PSM and half SPM (`fim` below; sec.
2.3), and the model learns to write a middle between a prefix and a suffix at little cost to
ordinary completion (Table 5). 34B and the Python models were trained without it. As in the paper,
an example is never cut across two contexts: each lies whole in one (the rest of the sequence it
does not fit in is padding, whose share each step logs), and a document whose example would not
fit in one is rendered plainly (--no-fim-whole-docs packs examples back to back, for comparisons).

Code Llama added four tokens for this (▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>; 32,000 -> 32,016 ids).
Started from a model whose tokenizer lacks them (Llama 2), this script writes the extended
tokenizer into OUT/tokenizer/ (tokenizer.extend_tokenizer: Code Llama's ids; a byte-level BPE such
as SmolLM2's, or a tiktoken file, gets them as added special tokens right after its ids), the
engine grows the embeddings to match (new rows start at the mean row) and the export OUT/hf/
carries the extended tokenizer. The held-out loss it logs is that of its own objective (the
held-out documents go through the same transform, with fixed split points), so it is not
comparable with another stage's plain next-token loss: bench/fim_vs_ar.py measures that one for
FIM and plain runs alike.

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
from pathlib import Path

import numpy as np

import train
import train_code
from data import Document, bos_eos
from model import PRESETS
from prompts import format_infill
from tokenizer import Tokenizer, extend_tokenizer


# Fill-in-the-middle (Code Llama sec. 2.3; Bavarian et al. 2022, "FIM" below).
#
# A document is cut at two character positions into prefix / middle / suffix and rearranged so that
# the middle comes last: the model, trained left to right, learns to write a middle given both
# sides. The example starts exactly as `format_infill`'s prompt for the same cut, so what the model
# sees at inference is what it was trained on (a prompt built slightly differently silently
# degrades the infills). One BOS rule for plain documents (`bos_eos`), infilling examples and
# every prompt (PSM, SPM, the prefix alone): tok.start_ids, BOS where the tokenizer's prompts
# carry one (Llama 2's; Code Llama's inference puts BOS before <PRE>; whether its FIM training
# did is UNCONFIRMED), none for SmolLM2's tokenizer.json.
# It ends with <EOT>, which is always a target (FIM sec. 3: the model must learn to stop), then
# EOS, so that every document in the packed stream still ends as `bos_eos` ends it and the next
# document (its BOS, where there is one) follows an EOS whatever the transform did. Every id is a
# target (FIM keeps the loss on all three parts; Code Llama is silent).
#
# "Only documents that are not cut across several model contexts" (sec. 2.3): an infilling example
# that cannot lie whole in one context is rendered plainly instead (its plain rendering is longer
# than seq_len, or the sentinels and the re-encoding of three parts push the example past it: a
# few documents near the limit), and one that can is placed whole in one context: the transform
# asks data.Batches for it (its third value), so when it does not fit in what is left of the
# current sequence, the rest is padding and it starts the next one. Packed back to back like any
# document, a third of the examples would be cut (measured on the standard library at 256
# tokens), a PSM middle then often trained without its prefix in view. The other documents are
# packed back to back as in the other stages; `whole_docs=False` packs the examples that way too,
# for comparisons. Every choice is a function of (seed, document, stream position), so a resume
# makes the same ones (Batches seeds `rng` by position; a document gets new cuts each epoch).


def fim_example(tok, prefix, middle, suffix, suffix_first=False):
    """The ids of one infilling training example (Code Llama sec. 2.3; FIM sec. 3, App. D):
    PSM: [BOS, ▁<PRE>] + enc(prefix) + [▁<SUF>] + enc_infilling(suffix) + [▁<MID>]
         + enc_infilling(middle) + [▁<EOT>, EOS]
    SPM: [BOS, ▁<PRE>, ▁<SUF>] + enc_infilling(suffix) + [▁<MID>] + enc(prefix + middle)
         + [▁<EOT>, EOS]
    BOS is there when `format_infill` puts it (tok.start_ids). SPM is FIM App. D's "compatible"
    variant: PSM with an empty prefix, then prefix and middle encoded as one text (sec. 2.3), so
    SPM never shows a token split at the prefix/middle boundary (App. E), and an SPM prompt
    (`format_infill(suffix_first=True)`) continues a prefix encoded as in training."""
    if suffix_first:
        ids = format_infill(tok, "", suffix, suffix_first=True) + tok.encode(prefix + middle)
    else:
        ids = format_infill(tok, prefix, suffix) + tok.encode_infilling(middle)
    return ids + [tok.eot_id, tok.eos_id]


def fim(tok, seq_len, rate=0.9, spm_rate=0.5, whole_docs=True):
    """The FIM transform for Batches: with probability `rate` a document becomes an infilling
    example, PSM or SPM (SPM with probability `spm_rate`; the paper: 0.9 and half and half, sec.
    2.3), if the example fits in one context of seq_len tokens; otherwise it is rendered as
    `bos_eos` does. `whole_docs`: examples are placed whole in one context (see above)."""
    if not 0 <= rate <= 1 or not 0 <= spm_rate <= 1:
        raise ValueError(f"FIM rate {rate} and SPM rate {spm_rate} must lie in [0, 1]")
    format_infill(tok, "", "")  # a tokenizer without the infilling pieces fails here, clearly
    plain = bos_eos(tok)

    def transform(doc: Document, rng):
        ids, mask = plain(doc, rng)
        u_fim, u_spm = rng.random(2)
        if len(ids) > seq_len or u_fim >= rate:
            return ids, mask, False
        text = doc.text  # decoded only for the documents that are transformed
        # Two cut points, independent and uniform over the characters (sec. 2.3), then sorted.
        a, b = sorted(int(c) for c in rng.integers(0, len(text) + 1, 2))
        example = fim_example(tok, text[:a], text[a:b], text[b:], u_spm < spm_rate)
        if len(example) > seq_len:  # never cut: rendered plainly, as a longer document is
            return ids, mask, False
        return np.array(example), None, whole_docs
    return transform


def setup(args, tok, d):
    """Stage 2's size-dependent LR (train_code.setup), the tokenizer with the infilling tokens
    (extended here when --init's lacks them) and the FIM transform."""
    tok, _ = train_code.setup(args, tok, d)
    if None in (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id):
        # Every process writes the same bytes atomically: no process ever reads a partial file.
        # The tokenizer's config (BOS/EOS names, add_bos) is written beside it.
        path = extend_tokenizer(tok.path, Path(args.out) / "tokenizer" / tok.path.name)
        old, tok = tok, Tokenizer.from_pretrained(path)
        if d.rank == 0:  # setup runs on every process; one says it
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
    p = train.parser(**train_code.DEFAULTS)  # stage 2's paper defaults: only the transform differs
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
    # the FIM flags shape the data stream too: a resume with other values is refused
    train.run(parser().parse_args(), setup,
              stream_flags=("fim_rate", "spm_rate", "fim_whole_docs"))
