"""Data throughput on this machine: `prepare` (tokenizing, all cores) and the training loader of one
process (mixing, packing, BOS/EOS, targets), with and without on-the-fly re-tokenization, then the
infilling stage's loader (train_infill.fim: decode, split, re-encode) built by 1, 2, 4, 8 worker
processes (train.py --loader-workers, data.LoaderWorkers).

Target: a loader process must outrun the ~10k tokens/s one H100 consumes training a 7B model
(torchtitan reports 2.9-6.7k tokens/s/GPU for Llama 3 8B under FSDP2) by 20x: 200k tokens/s. A
small model trains faster than one process renders infilling examples (0.35-0.4M tokens/s for a
25M model on one H200): N workers should give at least 0.7 x N times one process's rate, given N
free cores.

    python bench/bench_data.py [--tokenizer ../shared/data/llama2/tokenizer.model] [--seconds 5] \
        [--workers 1 2 4 8]
"""

import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import Batches, Corpus, LoaderWorkers, prepare  # noqa: E402
from tokenizer import Tokenizer, extend_tokenizer  # noqa: E402
from train_infill import fim  # noqa: E402

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


def loader_rate(corpora, tok, transform, seconds, seq_len=4096, rows=64, workers=0):
    """Tokens/s of one rank of eight (8 of 64 rows); `workers` processes build them, or (0) the
    calling process itself. The first batch (forking, first reads) is not timed. Also tokens per
    CPU-second of all the processes (the loop's and the workers'): on a busy machine the wall
    rate says how many cores were free, this one what N free cores would give."""
    b = Batches(corpora, [0.85, 0.15], seq_len, rows, seed=0, tok=tok, transform=transform,
                row_range=range(0, rows // 8))
    loader = LoaderWorkers(b, workers) if workers else b
    loader.next()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    n, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        x, _ = loader.next()
        n += x.size
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if workers:
        loader.close()  # joined: their CPU time is then counted
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu += (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    return n / wall, n / cpu


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/llama2/tokenizer.model"),
                   help="the tokenizer both sides encode with")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="time per measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="loader worker counts to measure the infilling loader with")
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
            rate = loader_rate(corpora, tok, transform, args.seconds)[0]
            print(f"loader, one process, 4,096-token rows, 2-source mix, {name}: "
                  f"{rate:,.0f} tokens/s = {rate / 10e3:,.0f}x one H100's 7B appetite (10k/s)")
        # The infilling stage: Code Llama's tokenizer (four tokens added) and its FIM transform.
        # Shards keep their ids: the extended tokenizer encodes text as the original does.
        cl = Tokenizer.from_pretrained(extend_tokenizer(args.tokenizer, Path(tmp) / "cl.model"))
        one, one_cpu = loader_rate(corpora, cl, fim(cl, 4096), args.seconds)
        print(f"FIM loader (train_infill.fim, rate 0.9, 4,096-token rows), in the training "
              f"process: "
              f"{one:,.0f} tokens/s, {one_cpu:,.0f} per CPU-second (load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        for n in args.workers:
            rate, cpu = loader_rate(corpora, cl, fim(cl, 4096), args.seconds, workers=n)
            note = "" if n <= os.cpu_count() else f" (only {os.cpu_count()} cores here)"
            print(f"FIM loader, {n} worker process(es): {rate:,.0f} tokens/s = "
                  f"{rate / one:.2f}x one process = {rate / one / n:.2f} x N{note}; "
                  f"{cpu:,.0f} per CPU-second = {cpu / one_cpu:.2f}x one process's: with N "
                  f"free cores, {cpu / one_cpu:.2f} x N")


if __name__ == "__main__":
    main()
