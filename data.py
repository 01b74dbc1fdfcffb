"""Training data for the Code Llama recipe: sources -> shards -> batches -> dialogs.

    python data.py prepare --data DIR_OR_JSONL ... --tokenizer TOKENIZER --out FOLDER

Sources (directories of code, .jsonl(.gz) and .parquet files) are read and filtered, tokenized once
into shards (`prepare`), mixed by weight and packed into training sequences (`Corpus`, `Batches`),
and chat records are encoded with their loss masks (`Dialogs`). The tokenizer lives in tokenizer.py
and the prompt layouts in prompts.py; their public names stay importable from here:

    from data import Tokenizer, format_infill, format_chat
"""
import contextlib
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from common import HelpFormatter, script_parser, write_atomic
from prompts import RESERVED_TAGS, check_dialog, dialog_tokens
# The tokenizer and the prompt layouts, importable from here too (they used to live here).
from prompts import format_chat, format_infill  # noqa: F401
from tokenizer import Tokenizer


# ---- corpus ----
# Reading sources, tokenizing them once into shards, mixing sources by weight and packing documents
# into training sequences (Code Llama sec. 2.2, Table 1).
#
# A prepared source is a folder:
#   meta.json             inputs, settings, the tokenizer's fingerprint, totals, skip counts;
#                         written last with "complete": true: a half-prepared folder is never used
#   shard-00000.bin       the documents' token ids back to back, no BOS/EOS (uint16 if they fit)
#   shard-00000.idx.npy   int64 offsets: document d of the shard is bin[idx[d]:idx[d + 1]]
#   shard-00000.lang.npy  uint16: each document's language, an index into the shard json's list
#   shard-00000.json      the shard's counts, written after its arrays: it marks the shard done
# The text is not stored. `prepare` keeps a document only if decode(encode(text)) == text, so a
# stage that works on characters (infilling splits documents at the character level, sec. 2.3) gets
# the exact text back by decoding. SentencePiece turns the character U+2581 "▁" into a space: the
# few files holding it (47 of the 19,433 .py files of this machine's Python 3.11 with its
# site-packages) are skipped as "no_roundtrip".

FORMAT = "codellama-shards-1"

# File extension -> language recorded for each document of a source directory.
EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cc": "c++", ".cpp": "c++",
    ".cxx": "c++", ".hpp": "c++", ".hh": "c++", ".java": "java", ".js": "javascript",
    ".mjs": "javascript", ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript",
    ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php", ".cs": "c#", ".swift": "swift",
    ".kt": "kotlin", ".scala": "scala", ".sh": "shell", ".bash": "shell", ".lua": "lua",
    ".pl": "perl", ".r": "r", ".jl": "julia", ".hs": "haskell", ".ml": "ocaml", ".sql": "sql",
    ".html": "html", ".css": "css", ".md": "markdown", ".rst": "restructuredtext", ".tex": "tex",
}
# Prose has long lines by nature: the minified-code filter below does not apply to it.
PROSE = {"", "markdown", "restructuredtext", "tex", "text"}

# The filters of Codex (Chen et al. 2021, sec. 3.1), since Code Llama does not detail its "publicly
# available, near-deduplicated" code (sec. 2.2): files over 1 MB, with a mean line length over 100
# or a longest line over 1,000 characters (minified or generated code) are dropped. UNCONFIRMED for
# Code Llama; flags of `prepare`.
MAX_FILE_BYTES = 1 << 20
MAX_LINE_CHARS = 1000
MAX_MEAN_LINE_CHARS = 100

# Encoded when a folder is prepared and again when it is trained on: the same ids mean the same
# tokenizer (an extended one, with infilling tokens, still encodes ordinary text the same way).
PROBE = "def f(x):\n    return [x ** 2 for x in range(10)]  # héllo, 世界\n\tTabs\r\n"


def check_text(text: str, n_bytes: int, lang: str, settings: dict) -> str | None:
    """The reason to skip a decoded document, or None to keep it."""
    if n_bytes > settings["max_file_bytes"]:
        return "too_large"
    if not text.strip():
        return "empty"
    if lang not in PROSE:
        lengths = [len(line) for line in text.splitlines()]
        if max(lengths) > settings["max_line_chars"] or \
                sum(lengths) / len(lengths) > settings["max_mean_line_chars"]:
            return "minified"
    return None


def check_bytes(raw: bytes, lang: str, settings: dict):
    """(text, language, skip reason) of a file's bytes."""
    if len(raw) > settings["max_file_bytes"]:
        return None, lang, "too_large"
    if b"\0" in raw[:8192]:  # git's test for binary content
        return None, lang, "binary"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, lang, "invalid_utf8"
    return text, lang, check_text(text, len(raw), lang, settings)


def _record_text(record, fields) -> tuple[str | None, str]:
    """(text, language) of a JSON / Parquet record; text None when no field holds a string."""
    if not isinstance(record, dict):
        return None, ""
    text = next((record[f] for f in fields if isinstance(record.get(f), str)), None)
    lang = record.get("lang", record.get("language"))
    return text, (lang.lower() if isinstance(lang, str) else "")


def _check_record(text, lang, settings):
    """(text, language, skip reason) of a JSON / Parquet record's text."""
    if text is None:
        return None, lang, "no_text_field"
    try:
        n_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate written as a JSON escape ("\ud800")
        return None, lang, "invalid_utf8"
    return text, lang, check_text(text, n_bytes, lang, settings)


# --------------------------------------------------------------------------------------------------
# Work units: what one worker reads into one shard. Listed once, in a fixed order, so re-running
# `prepare` maps the same inputs to the same shards and can skip the finished ones.


def list_units(inputs, settings) -> list[dict]:
    units, target = [], max(1, int(settings["shard_mb"] * 2**20))
    for path in map(Path, inputs):
        name = path.name.lower()
        if not path.exists():
            raise FileNotFoundError(f"data source {path} does not exist")
        if path.is_dir():
            files = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .venv, ...
                for n in sorted(names):
                    lang = settings["extensions"].get(os.path.splitext(n)[1].lower())
                    if lang is not None:
                        f = os.path.join(root, n)
                        files.append((f, lang, os.path.getsize(f) if os.path.isfile(f) else 0))
            if not files:
                raise ValueError(f"data source {path}: no files with a known extension ("
                                 f"{' '.join(sorted(settings['extensions']))})")
            group, size = [], 0
            for f, lang, n_bytes in files:
                group.append((f, lang))
                size += min(n_bytes, settings["max_file_bytes"])
                if size >= target:
                    units.append({"kind": "files", "files": group})
                    group, size = [], 0
            if group:
                units.append({"kind": "files", "files": group})
        elif name.endswith(".jsonl"):
            # Byte ranges: a unit reads the lines that start inside its range, so one big file is
            # still tokenized by several workers.
            size = path.stat().st_size
            for start in range(0, max(size, 1), target):
                units.append({"kind": "jsonl", "path": str(path), "start": start,
                              "end": min(start + target, size)})
        elif name.endswith(".jsonl.gz"):
            units.append({"kind": "jsonl.gz", "path": str(path)})  # gzip cannot seek: one unit
        elif name.endswith(".parquet"):
            pq = _pyarrow_parquet()
            meta = pq.ParquetFile(path).metadata
            group, size = [], 0
            for rg in range(meta.num_row_groups):
                group.append(rg)
                size += meta.row_group(rg).total_byte_size
                if size >= target:
                    units.append({"kind": "parquet", "path": str(path), "row_groups": group})
                    group, size = [], 0
            if group or not units:
                units.append({"kind": "parquet", "path": str(path), "row_groups": group})
        else:
            raise ValueError(f"data source {path}: expected a directory of source files, a .jsonl, "
                             ".jsonl.gz or .parquet file, or a folder made by `data.py prepare`")
    return units


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet files needs pyarrow: pip install pyarrow") from None
    return pq


def read_unit(unit, settings):
    """Yield (text, language, skip reason, location) for every document of a unit; a reason of None
    means the document is kept."""
    fields = settings["text_fields"]
    if unit["kind"] == "files":
        for f, lang in unit["files"]:
            try:
                if os.path.getsize(f) > settings["max_file_bytes"]:  # never read a huge file
                    yield None, lang, "too_large", f
                    continue
                with open(f, "rb") as fh:
                    raw = fh.read()
            except OSError:  # a broken symlink, a file removed meanwhile, no permission
                yield None, lang, "unreadable", f
                continue
            yield *check_bytes(raw, lang, settings), f
    elif unit["kind"] in ("jsonl", "jsonl.gz"):
        gz = unit["kind"] == "jsonl.gz"
        start, end = unit.get("start", 0), unit.get("end", float("inf"))
        with (gzip.open if gz else open)(unit["path"], "rb") as fh:
            if start > 0:
                fh.seek(start - 1)
                fh.readline()  # the line that began in the previous unit is that unit's
            while (at := fh.tell()) < end:
                line = fh.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                where = f"{unit['path']} (byte {at})"
                try:
                    record = json.loads(line)
                except UnicodeDecodeError:
                    yield None, "", "invalid_utf8", where
                    continue
                except json.JSONDecodeError:
                    yield None, "", "bad_json", where
                    continue
                text, lang = _record_text(record, fields)
                yield *_check_record(text, lang, settings), where
    elif unit["row_groups"]:
        pq = _pyarrow_parquet()
        f = pq.ParquetFile(unit["path"])
        names = set(f.schema_arrow.names)
        columns = [c for c in (*fields, "lang", "language") if c in names]
        for rg in unit["row_groups"]:
            for record in f.read_row_group(rg, columns=columns).to_pylist():
                text, lang = _record_text(record, fields)
                yield *_check_record(text, lang, settings), f"{unit['path']} (row group {rg})"


# --------------------------------------------------------------------------------------------------
# prepare: tokenize once, in parallel over processes


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


_worker_tokenizers = {}  # one tokenizer per worker process, loaded on its first unit


def _tokenize_unit(job):
    """Worker: read one unit, tokenize it and write its shard. Returns the shard's counts."""
    index, unit, out, tokenizer_path, settings = job
    if tokenizer_path not in _worker_tokenizers:
        _worker_tokenizers[tokenizer_path] = Tokenizer.from_pretrained(tokenizer_path)
    tok = _worker_tokenizers[tokenizer_path]
    dtype = token_dtype(tok.vocab_size)
    parts, offsets, langs, names, skipped, examples = [], [0], [], {}, {}, {}
    for text, lang, reason, where in read_unit(unit, settings):
        if reason is None:
            ids = tok.encode(text, bos=False, eos=False)
            if tok.decode(ids) != text:
                reason = "no_roundtrip"
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            if len(examples.setdefault(reason, [])) < 3:
                examples[reason].append(where)
            continue
        parts.append(np.asarray(ids, dtype=dtype))
        offsets.append(offsets[-1] + len(ids))
        langs.append(names.setdefault(lang, len(names)))
    base = Path(out) / f"shard-{index:05d}"
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    write_atomic(base.with_suffix(".bin"), tokens.tofile)
    for suffix, array in ((".idx.npy", np.asarray(offsets, np.int64)),
                          (".lang.npy", np.asarray(langs, np.uint16))):
        write_atomic(base.with_name(base.name + suffix), lambda p, a=array: _save_npy(p, a))
    stats = {"documents": len(langs), "tokens": int(offsets[-1]), "skipped": skipped,
             "examples": examples, "languages": list(names),
             "language_documents": np.bincount(np.asarray(langs, np.int64),
                                               minlength=len(names)).tolist()}
    write_atomic(base.with_suffix(".json"), json.dumps(stats))
    return stats


def _save_npy(path, array):
    with open(path, "wb") as f:  # a file object, so np.save does not append ".npy" to the tmp name
        np.save(f, array)


def prepare(inputs, tokenizer_path, out, workers=None, shard_mb=256, extensions=None,
            text_fields=("content", "text"), max_file_bytes=MAX_FILE_BYTES,
            max_line_chars=MAX_LINE_CHARS, max_mean_line_chars=MAX_MEAN_LINE_CHARS,
            progress=True) -> dict:
    """Tokenize `inputs` (source directories, .jsonl/.jsonl.gz/.parquet files) into shards in `out`,
    one work unit per shard, `workers` processes at a time. Returns meta.json's content.

    Re-running with the same inputs and settings skips the shards already written. Other inputs or
    settings (or input files changed since) in a folder that holds shards are an error, never a
    silent mix.
    """
    out = Path(out)
    tok = Tokenizer.from_pretrained(tokenizer_path)
    settings = dict(shard_mb=shard_mb, extensions=extensions or EXTENSIONS,
                    text_fields=list(text_fields), max_file_bytes=max_file_bytes,
                    max_line_chars=max_line_chars, max_mean_line_chars=max_mean_line_chars)
    inputs = [str(Path(p).resolve()) for p in inputs]
    units = list_units(inputs, settings)
    header = {"format": FORMAT, "inputs": inputs, "settings": settings,
              "plan": hashlib.sha256(json.dumps(units).encode()).hexdigest(),
              "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
              "dtype": np.dtype(token_dtype(tok.vocab_size)).name,
              "probe": tok.encode(PROBE, bos=False, eos=False), "complete": False}
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if any(old.get(k) != v for k, v in header.items() if k != "complete"):
            raise ValueError(f"{out} holds data prepared from other inputs, settings or tokenizer "
                             "(or the input files changed since): use another folder")
        if old.get("complete"):
            return old
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(meta_path, json.dumps(header, indent=1))

    done = [i for i in range(len(units)) if (out / f"shard-{i:05d}.json").exists()]
    todo = [(i, u, str(out), str(tokenizer_path), settings)
            for i, u in enumerate(units) if i not in set(done)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    if done and progress:
        print(f"prepare: {len(done)} of {len(units)} shards already done", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        if workers == 1:
            results = map(_tokenize_unit, todo)
        else:  # spawn, not fork: the caller may be a training process with threads (gloo, OpenMP)
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            results = pool.imap_unordered(_tokenize_unit, todo)
        t0, n_docs, n_tokens = time.time(), 0, 0
        for k, stats in enumerate(results, 1):
            n_docs, n_tokens = n_docs + stats["documents"], n_tokens + stats["tokens"]
            if progress:
                elapsed = time.time() - t0
                print(f"\rprepare: {len(done) + k}/{len(units)} shards | {n_docs:,} documents | "
                      f"{n_tokens:,} tokens | {n_tokens / elapsed:,.0f} tokens/s | "
                      f"{(len(todo) - k) * elapsed / k:.0f}s left ", end="", file=sys.stderr,
                      flush=True)
    if progress and todo:
        print(file=sys.stderr)

    shards, skipped, examples, languages = [], {}, {}, {}
    for i in range(len(units)):
        s = json.loads((out / f"shard-{i:05d}.json").read_text())
        shards.append({"documents": s["documents"], "tokens": s["tokens"]})
        for reason, n in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
            examples[reason] = (examples.get(reason, []) + s["examples"][reason])[:3]
        for lang, n in zip(s["languages"], s["language_documents"]):
            languages[lang] = languages.get(lang, 0) + n
    examples = {reason: [line_location(w) for w in where] for reason, where in examples.items()}
    meta = {**header, "complete": True, "shards": shards,
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards), "skipped": skipped,
            "skipped_examples": examples, "languages": languages}
    write_atomic(meta_path, json.dumps(meta, indent=1))
    return meta


def line_location(where: str) -> str:
    """"PATH (byte N)", where a JSONL record starts, as "PATH:LINE" (workers read byte ranges and
    cannot count lines; this reads the file up to that byte, for the few examples kept)."""
    m = re.fullmatch(r"(.*) \(byte (\d+)\)", where)
    if not m:
        return where
    path, at = m.group(1), int(m.group(2))
    lines = 1
    with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
        while at > 0:
            block = f.read(min(at, 1 << 20))
            if not block:
                break
            lines, at = lines + block.count(b"\n"), at - len(block)
    return f"{path}:{lines}"


def summary(meta: dict) -> str:
    """One line: counts, the skipped documents by reason with where the first ones are, and the
    documents per language (files: by extension; records: their "lang"/"language" field)."""
    examples = meta.get("skipped_examples", {})
    skipped = ", ".join(f"{k} {v:,}" + (f" ({', '.join(examples[k])}{', ...' if v > 3 else ''})"
                                        if examples.get(k) else "")
                        for k, v in sorted(meta["skipped"].items())) or "none"
    langs = ", ".join(f"{k or 'not given'} {v:,}"
                      for k, v in sorted(meta["languages"].items(), key=lambda kv: -kv[1])[:8])
    return (f"{meta['documents']:,} documents, {meta['tokens']:,} tokens in "
            f"{len(meta['shards'])} shards ({meta['dtype']}); skipped: {skipped}; "
            f"documents per language: {langs or 'none'}")


# --------------------------------------------------------------------------------------------------
# Reading prepared folders


def is_prepared(path) -> bool:
    meta = Path(path) / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("format") == FORMAT


@dataclass
class Document:
    """One document as a stage's transform sees it: token ids without BOS/EOS, its language, and its
    exact text (decoded on first use; `prepare` checked that decoding gives the text back)."""
    tokens: np.ndarray
    lang: str
    decode: Callable = field(repr=False)

    @cached_property
    def text(self) -> str:
        return self.decode(self.tokens.tolist())


class Corpus:
    """A folder written by `prepare`. Token ids stay on disk (memory maps); only the document
    offsets (8 bytes per document) are read up front."""

    def __init__(self, path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path}: no meta.json, not a folder made by "
                                    "`data.py prepare`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT or not self.meta.get("complete"):
            raise ValueError(f"{meta_path}: not a complete prepared folder (format "
                             f"{self.meta.get('format')!r}, complete {self.meta.get('complete')}); "
                             "re-run `data.py prepare` to finish it")
        self.dtype = np.dtype(self.meta["dtype"])
        n = len(self.meta["shards"])
        self.offsets = [np.load(self.path / f"shard-{i:05d}.idx.npy") for i in range(n)]
        self.langs = [np.load(self.path / f"shard-{i:05d}.lang.npy") for i in range(n)]
        self.lang_names = [json.loads((self.path / f"shard-{i:05d}.json").read_text())["languages"]
                           for i in range(n)]
        self.first_doc = np.cumsum([0] + [len(o) - 1 for o in self.offsets])
        self.n_docs, self.n_tokens = int(self.first_doc[-1]), int(self.meta["tokens"])
        self._maps = [None] * n

    def check_tokenizer(self, tok):
        if tok.encode(PROBE, bos=False, eos=False) != self.meta["probe"] or \
                tok.vocab_size < self.meta["vocab_size"]:
            raise ValueError(f"{self.path} was prepared with another tokenizer (vocab "
                             f"{self.meta['vocab_size']}, this one {tok.vocab_size}, or different "
                             "ids for the same text): prepare it again with this tokenizer")

    def tokens(self, d: int) -> np.ndarray:
        s = int(np.searchsorted(self.first_doc, d, side="right")) - 1
        if self._maps[s] is None:
            self._maps[s] = np.memmap(self.path / f"shard-{s:05d}.bin", dtype=self.dtype, mode="r")
        o = self.offsets[s]
        i = d - self.first_doc[s]
        return self._maps[s][o[i]:o[i + 1]]

    def lang(self, d: int) -> str:
        s = int(np.searchsorted(self.first_doc, d, side="right")) - 1
        return self.lang_names[s][self.langs[s][d - self.first_doc[s]]]


# --------------------------------------------------------------------------------------------------
# Mixtures and packing
#
# The global batch of step k has `rows` sequences of seq_len + 1 tokens. Row g is fed by its own
# streams, one per source: stream (g, s) reads positions g, g + rows, g + 2 * rows, ... of source
# s's document order, an endless run of epochs, each a fresh permutation seeded by (seed, s, epoch).
# Which source row g draws from at step k is seeded by (seed, k). So every row, and the whole global
# batch, is a pure function of (data, seed, step): a rank computes only its own rows, the same
# whatever the number of ranks, and the loader's state is two integers per (row, source): documents
# finished, and tokens taken from the current one. A resume re-reads only the documents in progress
# (checked by tests/test_train.py: the same losses after a resume).
#
# Documents are packed back to back, BOS/EOS marking the boundaries; attention crosses them, as
# neither the Code Llama nor the Llama 2 paper mentions a block-diagonal mask (model.py has none).
#
# With `whole_docs` (train_longctx.py), a document that fits in one sequence but not in what is left
# of the current one starts the next sequence instead of being cut, and the rest of the current one
# is padding: EOS ids after the last real token, which no real token attends to (attention is
# causal) and which are never targets. Long files are then seen whole, the repository-level context
# long-context fine-tuning is for (sec. 2.4). A transform may also ask this for one rendering (the
# infilling examples of train_infill.py, sec. 2.3), the other documents being packed back to back.
# The state stays (documents finished, offset): padding depends only on the stream.
# `Batches.packing` counts, for the last batch, the sequences made of one document and of several,
# and the padding tokens: the engine logs them every step.

IGNORE = -100  # the target of a position whose loss is masked (F.cross_entropy's ignore_index)
_MIX, _PERM, _DOC, _EVAL, _HOLDOUT = range(5)  # seed-sequence tags keep the random streams apart


def bos_eos(tok):
    """The plain transform: each document as BOS + tokens + EOS, every token a target (sec. 2.2).
    BOS where the tokenizer's prompts start with one (tok.start_ids: Llama 2's), so a document
    starts as a prompt does; a byte-level BPE such as SmolLM2's separates documents by EOS."""
    bos, eos = np.array(tok.start_ids, np.int64), np.array([tok.eos_id])

    def transform(doc: Document, rng):
        return np.concatenate([bos, doc.tokens, eos]), None
    return transform


class Batches:
    """The training stream over a mixture of prepared sources.

    `transform(doc, rng) -> (ids, mask)` renders one document (default: `bos_eos(tok)`); mask (bool
    per id, or None for all True) marks the ids that are targets; a third value, when there is one
    and it is True, asks for this rendering to lie whole in one sequence, as `whole_docs` asks for
    every document (when it fits in one). `rng` is seeded by the document's
    position in the stream, so a transform's choices (such as infilling split points) are the same
    after a resume. `row_range` is this rank's share of the rows. Each source keeps up to
    `eval_docs` documents (at most a tenth) out of training, for the held-out loss. `whole_docs`:
    see "Mixtures and packing" above. A source may also be `Dialogs` (below): its dialogs come with
    their own loss mask and skip the transform.
    """

    def __init__(self, corpora, weights, seq_len, rows, seed, tok, transform=None, row_range=None,
                 eval_docs=64, whole_docs=False):
        if not corpora or len(weights) != len(corpora) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"need one non-negative weight per source, got {weights}")
        for c in corpora:
            c.check_tokenizer(tok)
        self.corpora, self.seq_len, self.rows, self.seed = corpora, seq_len, rows, seed
        self.weights = np.asarray(weights, np.float64) / sum(weights)
        self.transform, self.decode = transform or bos_eos(tok), tok.decode
        self.row_range = row_range or range(rows)
        self.whole_docs, self.pad_id = whole_docs, tok.eos_id if tok.eos_id is not None else 0
        self.packing = (0, 0, 0)  # last batch: one-document sequences, several-document, padding
        self.train_ids, self.eval_ids = [], []
        for s, c in enumerate(corpora):
            n_eval = min(eval_docs, c.n_docs // 10)
            held = np.random.default_rng([_HOLDOUT]).choice(c.n_docs, n_eval, replace=False)
            held.sort()
            keep = np.ones(c.n_docs, bool)
            keep[held] = False
            self.train_ids.append(np.flatnonzero(keep))
            self.eval_ids.append(held)
            if not len(self.train_ids[-1]):
                raise ValueError(f"{c.path}: no documents to train on")
        self.step = 0
        self.drawn = [0] * len(corpora)  # sequences taken from each source so far (all rows)
        self.pos = {g: [[0, 0] for _ in corpora] for g in self.row_range}
        self._perms, self._rendered = {}, {}

    # -- state
    def state_dict(self) -> dict:
        return {"step": self.step, "drawn": list(self.drawn),
                "pos": {str(g): [list(p) for p in self.pos[g]] for g in self.row_range}}

    def load_state_dict(self, state: dict):
        missing = [g for g in self.row_range if str(g) not in state["pos"]]
        if missing or len(state["drawn"]) != len(self.corpora):
            raise ValueError("saved data position does not match this mixture (rows "
                             f"{missing[:3]}..., {len(state['drawn'])} sources)")
        self.step, self.drawn = state["step"], list(state["drawn"])
        self.pos = {g: [list(p) for p in state["pos"][str(g)]] for g in self.row_range}
        self._rendered = {}

    def epochs(self) -> list[float]:
        """How many times each source has been seen: the "Epochs" column of Code Llama's Table 1."""
        return [d * self.seq_len / max(c.n_tokens, 1) for d, c in zip(self.drawn, self.corpora)]

    # -- documents
    def _doc_at(self, s: int, i: int):
        """The document at position i of source s's endless stream, and its transform's rng."""
        ids = self.train_ids[s]
        epoch, j = divmod(i, len(ids))
        if (s, epoch) not in self._perms:
            if len(self._perms) >= 4 * len(self.corpora):  # rows straddle at most two epochs
                self._perms.pop(next(iter(self._perms)))
            self._perms[s, epoch] = np.random.default_rng([self.seed, _PERM, s, epoch]).permutation(
                len(ids))
        d = int(ids[self._perms[s, epoch][j]])
        return d, np.random.default_rng([self.seed, _DOC, s, i])

    def _render(self, s, d, rng):
        """(ids, mask, whether it must lie whole in one sequence) of document d of source s."""
        c = self.corpora[s]
        if isinstance(c, Dialogs):  # encoded with its loss mask (answers only); the transform
            ids, mask, whole = c.tokens(d), c.mask(d), False  # is for plain documents (sec. 2.5)
        else:
            ids, mask, whole = (*self.transform(Document(c.tokens(d), c.lang(d), self.decode),
                                                rng), False)[:3]
        ids = np.asarray(ids, np.int64)
        mask = np.ones(len(ids), bool) if mask is None else np.asarray(mask, bool)
        if len(mask) != len(ids):
            raise ValueError(f"transform returned {len(ids)} ids but a mask of {len(mask)}")
        return ids, mask, bool(whole)

    def _stream_doc(self, g, s, k):
        key = (g, s)
        if key not in self._rendered or self._rendered[key][0] != k:
            d, rng = self._doc_at(s, g + k * self.rows)
            self._rendered[key] = (k, *self._render(s, d, rng))
        return self._rendered[key][1:]

    def _read(self, g, s, k, off, n, whole=False):
        """n ids and mask bits from stream (g, s) starting at document k, offset off; where the
        stream stands after them; how many documents they come from, and how many are padding.
        `whole` (or a rendering that asks for it): a document that would be cut at the end but
        fits in a sequence is left for the next one, and padding fills the rest."""
        ids, mask = [], []
        empty = docs = 0
        while n > 0:
            doc_ids, doc_mask, doc_whole = self._stream_doc(g, s, k)
            if (whole or doc_whole) and docs and off == 0 and n < len(doc_ids) <= self.seq_len:
                ids.append(np.full(n, self.pad_id, np.int64))
                mask.append(np.zeros(n, bool))
                return np.concatenate(ids), np.concatenate(mask), k, off, docs, n
            take = doc_ids[off:off + n]
            ids.append(take)
            mask.append(doc_mask[off:off + n])
            docs += len(take) > 0
            n -= len(take)
            off += len(take)
            if off >= len(doc_ids):
                k, off = k + 1, 0
                empty = empty + 1 if not len(doc_ids) else 0
                if empty > 1000:
                    raise ValueError(f"{self.corpora[s].path}: the transform gives empty documents")
        return np.concatenate(ids), np.concatenate(mask), k, off, docs, 0

    def next(self):
        """This rank's rows of the next global batch: int64 inputs and targets (rows, seq_len); a
        target is IGNORE where the transform masked it."""
        L = self.seq_len
        source = np.random.default_rng([self.seed, _MIX, self.step]).choice(
            len(self.corpora), size=self.rows, p=self.weights)
        xs, ys, packing = [], [], [0, 0, 0]
        for g in self.row_range:
            s = int(source[g])
            k, off = self.pos[g][s]
            # seq_len + 1 ids give seq_len (input, target) pairs; the next sequence starts at the
            # last id of this one, so every id but a stream's first is a target exactly once.
            ids, mask, k, off, docs, pad = self._read(g, s, k, off, L, self.whole_docs)
            last, last_mask = self._read(g, s, k, off, 1)[:2]
            if pad:
                last_mask = np.zeros_like(last_mask)  # after padding, nothing to predict
            self.pos[g][s] = [k, off]
            packing[0 if docs == 1 else 1] += 1
            packing[2] += pad
            ids, mask = np.concatenate([ids, last]), np.concatenate([mask, last_mask])
            xs.append(ids[:-1])
            ys.append(np.where(mask[1:], ids[1:], IGNORE))
        for s in range(len(self.corpora)):
            self.drawn[s] += int((source == s).sum())
        self.step += 1
        self.packing = tuple(packing)
        return np.stack(xs), np.stack(ys)

    def held_out(self, n_seqs: int) -> list:
        """Up to n_seqs fixed sequences per source from its held-out documents, packed in order:
        [(source index, inputs, targets)], the same on every rank."""
        L, sets = self.seq_len, []
        for s, c in enumerate(self.corpora):
            ids, mask = [], []
            for d in self.eval_ids[s]:
                doc_ids, doc_mask, _ = self._render(s, int(d), np.random.default_rng(
                    [self.seed, _EVAL, s, int(d)]))
                ids.append(doc_ids)
                mask.append(doc_mask)
            if not ids:
                continue
            ids, mask = np.concatenate(ids), np.concatenate(mask)
            # the last sequence is filled with padding that is never a target, so that a small
            # held-out set (a few dialogs of an instruction set) still gets a loss
            n = min(n_seqs, -(-(len(ids) - 1) // L))
            if n == 0:
                continue
            pad = max(0, n * L + 1 - len(ids))
            ids = np.concatenate([ids, np.full(pad, self.pad_id, np.int64)])
            mask = np.concatenate([mask, np.zeros(pad, bool)])
            x = np.stack([ids[i * L:(i + 1) * L] for i in range(n)])
            y = np.stack([np.where(mask[i * L + 1:(i + 1) * L + 1], ids[i * L + 1:(i + 1) * L + 1],
                                   IGNORE) for i in range(n)])
            sets.append((s, x, y))
        return sets


# --------------------------------------------------------------------------------------------------
# Loader workers (train.py --loader-workers)
#
# The infilling transform decodes, splits and re-encodes every document it touches, about 0.75M
# tokens/s in one process: less than a GPU trains a small model on. Rows are independent streams
# (see "Mixtures and packing"), so N worker processes each build a contiguous block of this rank's
# rows, batch after batch, one batch ahead of the training loop; the loop joins the blocks. The
# batches are those the single process would build, bit for bit, and each block comes with its
# rows' stream position after it, so the main process's Batches always holds the position of the
# last batch it handed out: checkpoints and resumes work as without workers.
#
# Workers are forked (no pickling of the corpus or of a stage's transform closure) and never touch
# torch. Each talks to the loop over its own pipe, whose write end only the worker holds: a worker
# that dies (killed, out of memory) closes it, and the loop's read ends with EOF at once and stops
# the run with the worker's exit code, instead of waiting forever; a worker's exception travels
# over the pipe as its traceback. Likewise only the loop holds each pipe's read end (a worker
# closes those it was forked with), so a worker whose loop is gone gets a broken pipe and exits.


def _loader_worker(batches, rows, conn, inherited):
    """Worker: build this block of rows, batch after batch, and send each with its positions."""
    for c in inherited:  # read ends forked with it: the loop must hold the only one of each pipe
        c.close()
    try:
        batches.row_range = rows
        batches.pos = {g: batches.pos[g] for g in rows}
        while True:
            x, y = batches.next()
            conn.send((x, y, batches.packing, batches.state_dict()))
    except (BrokenPipeError, EOFError):  # the training loop is gone
        pass
    except BaseException:
        import traceback
        with contextlib.suppress(OSError):
            conn.send(traceback.format_exc())
    finally:
        conn.close()


class LoaderWorkers:
    """`batches.next()` run ahead by `n` worker processes (see above). next() returns what
    batches.next() would, and advances `batches` (step, positions, packing) as it would."""

    def __init__(self, batches: Batches, n: int):
        rows = list(batches.row_range)
        n = max(1, min(n, len(rows)))  # a worker builds at least one row
        self.batches, self.blocks = batches, [list(b) for b in np.array_split(rows, n)]
        ctx = multiprocessing.get_context("fork")
        self.conns, self.procs = [], []
        for w, block in enumerate(self.blocks):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_loader_worker, args=(batches, block, send,
                                                            [*self.conns, recv]),
                               daemon=True, name=f"loader-{w}")
            proc.start()
            send.close()  # the worker holds the only write end: its death is EOF here
            self.conns.append(recv)
            self.procs.append(proc)

    def _receive(self, w):
        try:
            item = self.conns[w].recv()
        except (EOFError, OSError):
            proc = self.procs[w]
            proc.join(5)
            code = proc.exitcode
            why = (f"killed by signal {-code}" if code is not None and code < 0
                   else f"exit code {code}")
            self.close()
            raise RuntimeError(f"data loader worker {w} (pid {proc.pid}) died ({why}) while "
                               f"building batch {self.batches.step + 1}: run stopped") from None
        if isinstance(item, str):
            self.close()
            raise RuntimeError(f"data loader worker {w} failed on batch "
                               f"{self.batches.step + 1}:\n{item}")
        return item

    def next(self):
        parts = [self._receive(w) for w in range(len(self.blocks))]
        b = self.batches
        for *_, state in parts:
            b.pos.update({int(g): p for g, p in state["pos"].items()})
        b.step, b.drawn = parts[0][3]["step"], list(parts[0][3]["drawn"])
        b.packing = tuple(int(sum(p[2][i] for p in parts)) for i in range(3))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def close(self):
        for conn in self.conns:
            conn.close()  # a worker blocked on sending sees a broken pipe and exits
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


# --------------------------------------------------------------------------------------------------
# Dialogs (instruction tuning: Code Llama - Instruct, sec. 2.5)
#
# A chat source is a .jsonl / .jsonl.gz file of {"messages": [{"role", "content"}, ...]} records:
# what self_instruct.py writes, and the common format of public instruction sets. It is read whole
# and each dialog is encoded once, in memory, in the tokenizer's own layout (dialog_tokens), with
# its loss mask: the answers and their end token only, as in Llama 2's SFT (Llama 2 paper, sec. 3.1;
# Code Llama does not say). Batches packs dialogs like documents but renders them with that mask,
# never through the stage's transform. A record is skipped, and counted by reason, when it is not
# JSON ("bad_json"), has no "messages" list ("no_messages"), holds a message that is not {"role":
# str, "content": str} ("bad_message"), breaks the turn order: an optional system message, then user
# and assistant alternating, ending with an answer ("bad_turns"), or holds a reserved tag such as
# [INST] or <<SYS>> that would forge a turn boundary ("reserved_tag"). A dialog longer than seq_len
# keeps its longest run of whole (user, answer) pairs that fits ("truncated"), or is dropped when
# its first pair alone does not fit ("too_long").

CHAT_LANG = "chat"


def is_dialogs(path) -> bool:
    """Whether `path` is a chat source: a .jsonl(.gz) file whose first valid record (a JSON object)
    holds "messages". Lines before it that are not are skipped here, and counted by the reader, as
    bad lines later in the file are; a file without any valid record is an error."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file() or not name.endswith((".jsonl", ".jsonl.gz")):
        return False
    first_bad = None
    with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:  # JSONDecodeError, or UnicodeDecodeError on bytes
                    record = None
                if isinstance(record, dict):
                    return "messages" in record
                first_bad = first_bad or (lineno, line)
    if first_bad:
        raise ValueError(f"{path}:{first_bad[0]}: not a JSON record: {first_bad[1][:60]!r}, nor "
                         "is any other line")
    return False


def _dialog_problem(record) -> str | None:
    """Why a parsed record cannot be trained on (a skip reason), or None."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return "no_messages"
    messages = record["messages"]
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
               and isinstance(m.get("content"), str) for m in messages):
        return "bad_message"
    try:
        turns = check_dialog(messages)
    except ValueError:
        return "bad_turns"
    if turns[-1]["role"] != "assistant":
        return "bad_turns"
    if any(tag in m["content"] for m in messages for tag in RESERVED_TAGS):
        return "reserved_tag"
    return None


class Dialogs:
    """A chat source, encoded in memory (see above). It has what Batches reads a Corpus by (path,
    n_docs, n_tokens, tokens(d), lang(d), check_tokenizer(tok)) and mask(d), dialog d's loss mask.
    Counts: `records` (non-empty lines), `skipped` (reason -> records), `truncated` (dialogs kept
    with fewer pairs); `lines` keeps the first line numbers of each reason and of "truncated"."""

    LINES_KEPT = 3

    def __init__(self, path, tok, seq_len):
        self.path, self.seq_len = Path(path), seq_len
        self.chat_format, self.probe = tok.chat_format, tok.encode(PROBE)
        self.records, self.truncated, self.skipped, self.lines = 0, 0, {}, {}
        ids, masks = [], []
        gz = self.path.name.lower().endswith(".gz")
        with (gzip.open if gz else open)(self.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                self.records += 1
                try:
                    record = json.loads(line)
                    reason = _dialog_problem(record)
                except ValueError:  # not JSON, or not UTF-8
                    reason = "bad_json"
                if reason is None:
                    reason = self._encode(tok, record["messages"], ids, masks)
                if reason is not None:
                    self.lines.setdefault(reason, [])
                    if len(self.lines[reason]) < self.LINES_KEPT:
                        self.lines[reason].append(lineno)
                    if reason == "truncated":
                        self.truncated += 1
                    else:
                        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if not ids:
            raise ValueError(f"{self.path}: no dialog to train on ({self.summary()})")
        self.offsets = np.cumsum([0] + [len(i) for i in ids])
        self.ids = np.concatenate(ids).astype(token_dtype(tok.vocab_size))
        self.masks = np.concatenate(masks).astype(bool)
        self.n_docs, self.n_tokens = len(ids), int(self.offsets[-1])

    def _encode(self, tok, messages, ids, masks) -> str | None:
        """Append the dialog, cut to its longest prefix of whole pairs that fits in seq_len."""
        first = int(messages[0]["role"] == "system")
        pairs = (len(messages) - first) // 2
        for k in range(pairs, 0, -1):
            d_ids, d_mask = dialog_tokens(tok, messages[:first + 2 * k])
            if len(d_ids) <= self.seq_len:
                ids.append(d_ids)
                masks.append(d_mask)
                return "truncated" if k < pairs else None
        return "too_long"

    def summary(self) -> str:
        def where(reason, n):
            more = ", ..." if n > len(self.lines[reason]) else ""
            return f"line {', '.join(map(str, self.lines[reason]))}{more}"
        kept = self.records - sum(self.skipped.values())
        skipped = ", ".join(f"{r} {n} ({where(r, n)})" for r, n in sorted(self.skipped.items()))
        truncated = f" ({where('truncated', self.truncated)})" if self.truncated else ""
        return (f"{self.records} records, {kept} dialogs kept ({self.chat_format} layout), "
                f"{self.truncated} truncated to fit {self.seq_len} tokens{truncated}; skipped: "
                f"{skipped or 'none'}")

    def check_tokenizer(self, tok):
        if tok.chat_format != self.chat_format or tok.encode(PROBE) != self.probe:
            raise ValueError(f"{self.path} was encoded with another tokenizer than {tok.path}")

    def tokens(self, d: int) -> np.ndarray:
        return self.ids[self.offsets[d]:self.offsets[d + 1]]

    def mask(self, d: int) -> np.ndarray:
        return self.masks[self.offsets[d]:self.offsets[d + 1]]

    def lang(self, d: int) -> str:
        return CHAT_LANG


# --------------------------------------------------------------------------------------------------
# Command line


def add_reader_flags(p):
    """The flags choosing what is read from a source and what the filters skip: `prepare`'s, and
    dedup.py's, which reads the same way before it."""
    p.add_argument("--ext", default=None,
                   help="comma-separated extensions to read from directories, e.g. py,pyi for "
                        "Python only; None: all in data.EXTENSIONS")
    p.add_argument("--text-field", nargs="+", default=["content", "text"],
                   help="JSONL/Parquet fields holding the text, the first present is used")
    p.add_argument("--max-file-bytes", type=int, default=MAX_FILE_BYTES,
                   help="larger files are skipped unread (too_large)")
    p.add_argument("--max-line-chars", type=int, default=MAX_LINE_CHARS,
                   help="a document with a longer line is skipped (long_line: minified or data)")
    p.add_argument("--max-mean-line-chars", type=float, default=MAX_MEAN_LINE_CHARS,
                   help="a document whose lines are longer on average is skipped")


def reader_settings(p, args) -> dict:
    """The keyword arguments of `prepare` (and dedup.dedup) that add_reader_flags' flags set."""
    extensions = None
    if args.ext:
        wanted = {"." + e.strip().lstrip(".").lower() for e in args.ext.split(",")}
        unknown = wanted - set(EXTENSIONS)
        if unknown:
            p.error(f"--ext: unknown extension(s) {', '.join(sorted(unknown))}")
        extensions = {e: lang for e, lang in EXTENSIONS.items() if e in wanted}
    return dict(extensions=extensions, text_fields=args.text_field,
                max_file_bytes=args.max_file_bytes, max_line_chars=args.max_line_chars,
                max_mean_line_chars=args.max_mean_line_chars)


PREPARE_DOC = """Tokenize a data source once, into shards for training (train_*.py also does it
itself for a raw --data, into OUT/data).

    python data.py prepare --data data/raw/code --tokenizer Llama-2-7b-hf/tokenizer.model \\
        --out data/code
    python data.py prepare --data /usr/share/doc --ext md,rst --tokenizer runs/longctx-tiny/hf \\
        --out runs/data/nl
"""


def main(argv=None):
    p = script_parser(__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prepare", help=PREPARE_DOC.split("\n")[0],
                       description=PREPARE_DOC.split("\n")[0],
                       epilog=PREPARE_DOC.partition("\n")[2].strip("\n"),
                       formatter_class=HelpFormatter)
    q.add_argument("--data", nargs="+", required=True,
                   help="directories of source files, .jsonl(.gz) or .parquet files: one source")
    q.add_argument("--tokenizer", required=True, help="tokenizer file or checkpoint folder")
    q.add_argument("--out", required=True, help="folder for the shards")
    q.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizing processes")
    q.add_argument("--shard-mb", type=float, default=256, help="input megabytes per shard")
    add_reader_flags(q)
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        meta = prepare(args.data, args.tokenizer, args.out, workers=args.workers,
                       shard_mb=args.shard_mb, **reader_settings(q, args))
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.out}: {summary(meta)} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
