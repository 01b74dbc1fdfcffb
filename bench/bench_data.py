"""Data throughput on this machine: `prepare` (tokenizing, all cores) and the training loader of one
process (mixing, packing, BOS/EOS, targets), with and without on-the-fly re-tokenization.

Target: a loader process must outrun the ~10k tokens/s one H100 consumes training a 7B model
(torchtitan reports 2.9-6.7k tokens/s/GPU for Llama 3 8B under FSDP2) by 20x: 200k tokens/s.

    python bench/bench_data.py [--tokenizer ../shared/data/llama2/tokenizer.model] [--seconds 5]
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import Batches, Corpus, Tokenizer, prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(os.__file__).parent
PACKAGES = ["asyncio", "email", "json", "logging", "multiprocessing", "xml", "http", "importlib",
            "concurrent", "urllib", "sqlite3", "tomllib", "zoneinfo", "wsgiref", "xmlrpc"]


def retokenize(tok):
    """What the infilling stage does to each document on the fly (Code Llama sec. 2.3): decode its
    text, cut it at two random characters, encode the three parts again."""
    def transform(doc, rng):
        text = doc.text
        a, b = sorted(rng.integers(0, len(text) + 1, size=2))
        ids = [tok.bos_id, *tok.encode(text[:a]), *tok.encode_infilling(text[b:]),
               *tok.encode_infilling(text[a:b]), tok.eos_id]
        return np.asarray(ids), None
    return transform


def loader_rate(corpora, tok, transform, seconds, seq_len=4096, rows=64):
    b = Batches(corpora, [0.85, 0.15], seq_len, rows, seed=0, tok=tok, transform=transform,
                row_range=range(0, rows // 8))  # one rank of eight
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _ = b.next()
        n += x.size
    return n / (time.perf_counter() - t0)


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/llama2/tokenizer.model"),
                   help="the tokenizer both sides encode with")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="time per measurement")
    args = p.parse_args()
    tok = Tokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, os.cpu_count()):
            t0 = time.perf_counter()
            meta = prepare([STDLIB / p for p in PACKAGES], args.tokenizer,
                           Path(tmp) / f"w{workers}", workers=workers, shard_mb=0.5,
                           progress=False)
            dt = time.perf_counter() - t0
            print(f"prepare, {workers} process(es): {meta['tokens']:,} tokens, "
                  f"{meta['documents']} files in {dt:.2f}s: {meta['tokens'] / dt:,.0f} tokens/s "
                  "(tokenize + decode check + write)")
        code = Corpus(Path(tmp) / f"w{os.cpu_count()}")
        prepare([STDLIB / "unittest"], args.tokenizer, Path(tmp) / "other", progress=False)
        corpora = [code, Corpus(Path(tmp) / "other")]
        for name, transform in (("BOS + document + EOS", None),
                                ("decode + split + re-encode", retokenize(tok))):
            rate = loader_rate(corpora, tok, transform, args.seconds)
            print(f"loader, one process, 4,096-token rows, 2-source mix, {name}: "
                  f"{rate:,.0f} tokens/s = {rate / 10e3:,.0f}x one H100's 7B appetite (10k/s)")


if __name__ == "__main__":
    main()
