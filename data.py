"""Data for the Code Llama recipe: the tokenizer, the prompt layouts (infilling, chat), and below
them the corpus, packing, chat-dialog and FIM code that the training stages share.

    from data import Tokenizer, format_infill, format_chat
    tok = Tokenizer.from_pretrained("../shared/data/llama2/tokenizer.model")  # or a folder
    ids = format_infill(tok, "def add(a, b):\n    ", "\n    return c\n")

Three tokenizer files are read, all behind one interface:
- SentencePiece `tokenizer.model` (Llama 2, Code Llama), run by the sentencepiece library;
- tiktoken's base64-rank `tokenizer.model` (Llama 3), run by tiktoken;
- HF `tokenizer.json` with a byte-level BPE model (SmolLM2, GPT-2 style), run by tiktoken too, with
  ids equal to those of the HF `tokenizers` library.
Text is always encoded as plain text: a special token's name inside a code file ("<|im_start|>",
"<PRE>", "</s>") is never turned into the special id, so data cannot forge control tokens.
"""
import argparse
import base64
import contextlib
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import struct
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import regex  # a tiktoken dependency; has the \p{L} classes that HF's pre-tokenizers use

# Code Llama's infilling pieces (RECIPE.md sec. 2, "Tokenizer details"), looked up by name.
INFILL_PIECES = {"prefix": "▁<PRE>", "suffix": "▁<SUF>", "middle": "▁<MID>", "eot": "▁<EOT>"}
# Code Llama 7B/13B put them at 32007-32010 of 32,016 ids, i.e. 7..10 past Llama 2's 32,000.
INFILL_OFFSET = 7

# GPT-2's pre-tokenizer regex, which HF's ByteLevel pre-tokenizer runs when use_regex is true.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3's pre-tokenizer regex and special tokens (meta-llama/llama3 tokenizer.py): 256 specials
# placed right after the BPE ranks, so <|begin_of_text|> = 128000 for its 128,000 ranks.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                   + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>",
                      "<|eot_id|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])


def bytes_to_unicode():
    """GPT-2's byte-level alphabet: each byte as one printable character (tokenizer.json pieces
    are strings over it). Printable Latin-1 bytes stand for themselves; the other 68 bytes take
    the characters from U+0100 on, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def _atomic_write(path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _token_name(value):
    """tokenizer_config.json writes a token as "<s>" or as {"content": "<s>", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _split(piece, pattern, behavior, invert):
    """One HF `Split` pre-tokenizer step on one piece: cut at the matches of `pattern` (at the
    text between them when `invert`) and keep the delimiters as `behavior` says."""
    spans, last = [], 0  # (text, is_delimiter), covering the piece
    for m in pattern.finditer(piece):
        if m.start() > last:
            spans.append([piece[last:m.start()], invert])
        spans.append([m.group(), not invert])
        last = m.end()
    if last < len(piece):
        spans.append([piece[last:], invert])
    if behavior == "Isolated":
        out = [s for s, _ in spans]
    elif behavior == "Removed":
        out = [s for s, delim in spans if not delim]
    elif behavior == "MergedWithPrevious":  # "a-b--c" -> "a-", "b-", "-", "c"
        out, prev_delim = [], False
        for s, delim in spans:
            if delim and not prev_delim and out:
                out[-1] += s
            else:
                out.append(s)
            prev_delim = delim
    elif behavior == "MergedWithNext":  # "a-b--c" -> "a", "-b", "-", "-c"
        out, next_delim = [], False
        for s, delim in reversed(spans):
            if delim and not next_delim and out:
                out[-1] = s + out[-1]
            else:
                out.append(s)
            next_delim = delim
        out.reverse()
    elif behavior == "Contiguous":  # runs of delimiters and runs of text
        out, prev = [], None
        for s, delim in spans:
            if delim == prev:
                out[-1] += s
            else:
                out.append(s)
            prev = delim
    else:
        raise ValueError(f"unknown Split behavior {behavior!r}")
    return [s for s in out if s]


def _pre_tokenizer_stages(spec, where):
    """HF pre_tokenizer JSON -> a list of stages, applied in order to every piece:
    ("split", compiled regex, behavior, invert) or ("prefix_space",)."""
    if spec is None:
        return []
    kind = spec.get("type")
    if kind == "Sequence":
        return [st for sub in spec["pretokenizers"] for st in _pre_tokenizer_stages(sub, where)]
    if kind == "ByteLevel":
        stages = [("prefix_space",)] if spec.get("add_prefix_space", False) else []
        if spec.get("use_regex", True):
            stages.append(("split", regex.compile(GPT2_PATTERN), "Isolated", False))
        return stages
    if kind == "Digits":  # each digit alone, or runs of digits
        pattern = r"\p{N}" if spec.get("individual_digits", False) else r"\p{N}+"
        return [("split", regex.compile(pattern), "Isolated", False)]
    if kind == "Split":
        pat = spec["pattern"]
        pat = pat["Regex"] if "Regex" in pat else regex.escape(pat["String"])
        return [("split", regex.compile(pat), spec["behavior"], spec.get("invert", False))]
    raise ValueError(f"{where}: pre_tokenizer type {kind!r} is not supported "
                     "(ByteLevel, Digits, Split and Sequence are)")


class Tokenizer:
    """One tokenizer, whatever the file format. See the module docstring; built by from_pretrained.

    encode(text, bos, eos) / decode(ids); encode_infilling / decode_infilling (Code Llama's
    suffix and middle encoding without SentencePiece's implicit leading space); vocab_size;
    bos_id, eos_id, pad_id; prefix_id, suffix_id, middle_id, eot_id (None where absent); add_bos
    (whether prompts start with BOS under this tokenizer's configuration); chat_format.
    """

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            found = [path / n for n in ("tokenizer.model", "tokenizer.json")
                     if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json in it")
            path = found[0]  # Llama 2 HF folders hold both; the SentencePiece file is the original
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self.path = path
        cfg_path = path.parent / "tokenizer_config.json"
        self.config_path = cfg_path if cfg_path.is_file() else None
        self.config = json.loads(cfg_path.read_text(encoding="utf-8")) if self.config_path else {}
        self.chat_template = self.config.get("chat_template")

        with open(path, "rb") as f:
            head = f.read(256)
        if head.lstrip().startswith(b"{"):
            self._load_tokenizer_json(path)
        elif re.match(rb"[A-Za-z0-9+/]+=* \d+\r?\n", head):
            self._load_tiktoken(path)
        else:
            self._load_sentencepiece(path)

        for key in ("bos", "eos", "pad"):  # tokenizer_config.json, when present, has the last word
            name = _token_name(self.config.get(f"{key}_token"))
            if name is not None:
                if self.piece_to_id(name) is None:
                    raise ValueError(f"{cfg_path}: {key}_token {name!r} is not in the vocabulary")
                setattr(self, f"{key}_id", self.piece_to_id(name))
        if "add_bos_token" in self.config:
            self.add_bos = bool(self.config["add_bos_token"])
        for key, piece in INFILL_PIECES.items():
            setattr(self, f"{key}_id", self.piece_to_id(piece))

    @classmethod
    def from_pretrained(cls, path):
        """A checkpoint folder (tokenizer.model or tokenizer.json inside) or a tokenizer file."""
        return cls(path)

    # ---- the three loaders ----

    def _load_sentencepiece(self, path):
        import sentencepiece as spm
        self.kind = "sentencepiece"
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: neither tokenizer.json, tiktoken ranks nor a SentencePiece "
                             f"model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None  # Llama: -1, none
        self.add_bos = True  # Llama 2 / Code Llama prompts start with BOS (RECIPE.md sec. 2, 4)
        # Code Llama's trick to drop the implicit leading space (RECIPE.md sec. 2): encode a dummy
        # "☺" in front, then drop the ids of the dummy ("▁", "☺" in Llama's vocabulary).
        self._dummy = self.sp.encode("☺")

    def _load_tiktoken(self, path):
        ranks = {}
        for lineno, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'base64token rank', got {line[:60]!r}")
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
        self.kind = "tiktoken"
        n = len(ranks)
        specials = {s: n + i for i, s in enumerate(LLAMA3_SPECIALS)}
        # Tokens added after Llama 3's specials (extend_tokenizer's infilling tokens): a rank file
        # has no place for them, tokenizer_config.json's added_tokens_decoder names them.
        added = self.config.get("added_tokens_decoder", {})
        for i in sorted(map(int, added)):
            if i >= n + len(LLAMA3_SPECIALS):
                if i != n + len(specials):
                    raise ValueError(f"{self.config_path}: added token id {i} leaves a gap after "
                                     f"id {n + len(specials) - 1}")
                specials[_token_name(added[str(i)])] = i
        pieces = {**ranks, **{s.encode(): i for s, i in specials.items()}}
        # tiktoken panics on a byte it cannot rank: rank missing bytes past the vocabulary, and
        # drop them from the output (as HF drops bytes its byte-level vocabulary lacks).
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        rank_to_id = list(range(n)) + [None] * len(missing) if missing else None
        ranks.update({b: n + k for k, b in enumerate(missing)})
        self._normal_form = None
        self._setup_bpe(ranks, LLAMA3_PATTERN, [], rank_to_id, pieces, added=specials)
        self.bos_id, self.eos_id, self.pad_id = n, n + 1, None
        self.add_bos = True  # Llama 3 prompts start with <|begin_of_text|>

    def _load_tokenizer_json(self, path):
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model.type is {model.get('type')!r}; only BPE is supported")
        parts = [spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}]
        parts += parts[0].get("pretokenizers", []) + parts[1].get("decoders", [])
        if not any(p.get("type") == "ByteLevel" for p in parts):
            raise ValueError(f"{path}: not a byte-level BPE (no ByteLevel pre-tokenizer or "
                             "decoder); use the SentencePiece tokenizer.model instead")
        norm = (spec.get("normalizer") or {}).get("type")
        if norm not in (None, "NFC", "NFD", "NFKC", "NFKD"):
            raise ValueError(f"{path}: normalizer {norm!r} is not supported")
        self.kind = "tokenizer.json"
        self._normal_form = norm

        b2u = bytes_to_unicode()
        # Byte-level string -> bytes through latin-1; characters outside the alphabet become
        # U+FFFF, which latin-1 cannot encode, so they raise.
        table = {cp: 0xFFFF for cp in range(256)}
        table.update({ord(c): b for b, c in b2u.items()})

        def to_bytes(token, where):
            try:
                return token.translate(table).encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError(f"{path}: {where} {token!r} is not a byte-level token") from None

        vocab = model["vocab"]
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        unk_id = vocab.get(model.get("unk_token")) if model.get("unk_token") else None
        # tiktoken merges the adjacent pair whose joined bytes have the lowest rank, while HF
        # applies the listed merge with the lowest index: ranking each token by the index of the
        # merge that makes it gives the same result, unless a token can also form from a pair
        # that is not its merge (tests compare with `tokenizers` on real code). Every byte gets
        # a rank: tiktoken panics (a PanicException, not an Exception) on a byte it cannot rank,
        # and some vocabularies lack rare bytes (SmolLM2 lacks 21).
        ranks = {bytes([b]): b for b in range(256)}
        reachable = {bytes([b]) for b in range(256) if b2u[b] in vocab}
        # A byte outside the vocabulary is dropped by HF, or becomes unk_token when one is set.
        rank_to_id = [vocab.get(b2u[b], unk_id) for b in range(256)]
        for k, merge in enumerate(model.get("merges", [])):
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            if a + b not in vocab:
                raise ValueError(f"{path}: merge {k} {merge!r} makes a token not in the vocab")
            ba, bb = to_bytes(a, "merge part"), to_bytes(b, "merge part")
            if ba in reachable and bb in reachable and ba + bb not in ranks:
                ranks[ba + bb] = len(rank_to_id)
                rank_to_id.append(vocab[a + b])
                reachable.add(ba + bb)
        if model.get("ignore_merges"):  # whole pre-tokens found in the vocab skip the merges
            for token, i in vocab.items():
                if token not in added and to_bytes(token, "token") not in ranks:
                    ranks[to_bytes(token, "token")] = len(rank_to_id)
                    rank_to_id.append(i)

        pieces = {to_bytes(t, "token"): i for t, i in vocab.items() if t not in added}
        pieces.update({t.encode(): i for t, i in added.items()})
        # Non-special added tokens are matched inside text by HF; special ones are not here.
        plain = sorted((t["content"] for t in spec.get("added_tokens", [])
                        if not t.get("special")), key=len, reverse=True)
        stages = [("added", regex.compile("|".join(map(regex.escape, plain))))] if plain else []
        stages += _pre_tokenizer_stages(spec.get("pre_tokenizer"), f"{path}: pre_tokenizer")
        # tiktoken runs the last regex split itself when it keeps every piece ("Isolated"); the
        # extra alternative keeps text the regex does not match, as HF does, instead of losing it.
        if stages and stages[-1][0] == "split" and stages[-1][2:] == ("Isolated", False):
            pat = stages.pop()[1].pattern
            pattern = f"(?:{pat})|(?:(?!(?:{pat}))[\\s\\S])+"
        else:
            pattern = r"[\s\S]+"
        self._setup_bpe(ranks, pattern, stages, rank_to_id, pieces, added)

        self.bos_id = self.eos_id = self.pad_id = None  # tokenizer_config.json names them
        self.add_bos = False
        post = spec.get("post_processor") or {}
        for p in [post] + post.get("processors", []):
            if p.get("type") == "TemplateProcessing" and "SpecialToken" in p["single"][0]:
                self.add_bos = True  # e.g. Llama 3: "<|begin_of_text|> $A"
                self.bos_id = self.piece_to_id(p["single"][0]["SpecialToken"]["id"])

    def _setup_bpe(self, ranks, pattern, stages, rank_to_id, pieces, added):
        """Shared by the two tiktoken-run formats. pieces: token bytes -> id; added: name -> id
        of the added tokens (special ones are never produced from text). rank_to_id: tiktoken
        rank -> our id (None: identity), with None entries for bytes that are dropped."""
        import tiktoken
        self._bpe = tiktoken.Encoding(f"bpe-{self.path}", pat_str=pattern,
                                      mergeable_ranks=ranks, special_tokens={})
        self._stages = stages
        self._rank_to_id = rank_to_id
        self._drops = rank_to_id is not None and None in rank_to_id
        self._id_to_bytes = [b""] * (max(pieces.values()) + 1)
        for token, i in pieces.items():
            self._id_to_bytes[i] = token
        self._added = added
        # Pieces are named as in tokenizer.json: byte-level strings ("Ġthe"), specials as text.
        b2u = bytes_to_unicode()
        self._piece_names = ["".join(b2u[b] for b in t) for t in self._id_to_bytes]
        for name, i in added.items():
            self._piece_names[i] = name
        self._piece_ids = {name: i for i, name in enumerate(self._piece_names)}
        self.vocab_size = len(self._id_to_bytes)

    # ---- encode / decode ----

    def encode(self, text, bos=False, eos=False):
        """Plain-text ids (special-token names in `text` stay text), with optional BOS / EOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        if self.kind == "sentencepiece":
            ids = self.sp.encode(text)
        else:
            ids = self._encode_bpe(text, self._stages)
        for flag, key in ((bos, "bos"), (eos, "eos")):
            if flag and getattr(self, f"{key}_id") is None:
                raise ValueError(f"{self.path}: no {key.upper()} token is defined")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def _encode_bpe(self, text, stages):
        if self._normal_form:
            text = unicodedata.normalize(self._normal_form, text)
        pieces = [text] if text else []
        for stage in stages:  # HF applies each pre-tokenizer to every piece of the last
            out = []
            for p in pieces:
                if isinstance(p, int):  # an added token's id, already final
                    out.append(p)
                elif stage[0] == "split":
                    out += _split(p, *stage[1:])
                elif stage[0] == "prefix_space":
                    out.append(p if p.startswith(" ") else " " + p)
                else:  # "added": matched added tokens become ids
                    last = 0
                    for m in stage[1].finditer(p):
                        out += [p[last:m.start()], self._added[m.group()]]
                        last = m.end()
                    out.append(p[last:])
            pieces = [p for p in out if p != ""]
        ids = []
        for p in pieces:
            if isinstance(p, int):
                ids.append(p)
                continue
            ranks = self._bpe.encode_ordinary(p)
            m = self._rank_to_id
            if m is None:
                ids += ranks
            elif self._drops:
                ids += [m[r] for r in ranks if m[r] is not None]
            else:
                ids += [m[r] for r in ranks]
        return ids

    def decode(self, ids):
        """Text of `ids`. SentencePiece drops BOS/EOS/control pieces as it always does; byte-level
        formats write special tokens as their names; broken UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self.sp.decode(ids)
        return b"".join(self._id_to_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def encode_infilling(self, text):
        """Ids of a suffix or middle without the tokenizer's implicit leading space (Code Llama
        sec. 2.3: the suffix and middle are pieces of a line, not the start of a text).
        SentencePiece prepends "▁" to every text: Code Llama encodes a dummy "☺" in front and
        drops its ids. A byte-level BPE encodes exactly the bytes it is given, so nothing
        replaces that trick: its one implicit space is the ByteLevel pre-tokenizer's
        add_prefix_space (false for SmolLM2, GPT-2 and Llama 3), and that step is skipped here."""
        if self.kind == "sentencepiece":
            return self.sp.encode("☺" + text)[len(self._dummy):]
        return self._encode_bpe(text, [st for st in self._stages if st[0] != "prefix_space"])

    def decode_infilling(self, ids):
        """The decode that matches encode_infilling: no leading space is stripped (a byte-level
        decode never strips one)."""
        if self.kind == "sentencepiece":
            return self.sp.decode(self._dummy + [int(i) for i in ids])[1:]
        return self.decode(ids)

    def piece_to_id(self, piece):
        """Id of a vocabulary piece ("▁<PRE>", "<|im_start|>", "Ġthe"), or None."""
        if self.kind == "sentencepiece":
            i = self.sp.piece_to_id(piece)  # unknown pieces come back as unk's id
            return i if self.sp.id_to_piece(i) == piece else None
        return self._piece_ids.get(piece)

    def id_to_piece(self, i):
        if self.kind == "sentencepiece":
            return self.sp.id_to_piece(int(i))
        return self._piece_names[int(i)]

    @property
    def chat_format(self):
        """"chatml" for vocabularies with <|im_start|> (SmolLM2), else Llama 2's [INST] layout."""
        return "chatml" if self.piece_to_id("<|im_start|>") is not None else "llama2"

    def save(self, out_dir):
        """Copy the tokenizer file (and tokenizer_config.json) into a checkpoint folder."""
        out_dir = Path(out_dir)
        name = "tokenizer.json" if self.kind == "tokenizer.json" else "tokenizer.model"
        copies = [(self.path, name)]
        if self.config_path:
            copies.append((self.config_path, "tokenizer_config.json"))
        for src, dst in copies:
            if not (out_dir / dst).exists() or not (out_dir / dst).samefile(src):
                _atomic_write(out_dir / dst, Path(src).read_bytes())
        return out_dir

    def __repr__(self):
        return f"Tokenizer({self.kind}, {self.path}, vocab_size={self.vocab_size})"


def _proto_varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def extend_tokenizer(src, out_path):
    """Write `src` plus Code Llama's four infilling tokens (sec. 2.3) to `out_path`, a file of the
    same format, with `src`'s tokenizer_config.json beside it. Returns out_path.

    SentencePiece (Llama 2): Code Llama padded the vocabulary to a multiple of 16, 32,000 ->
    32,016, with ▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT> at 32007-32010 (RECIPE.md sec. 2). The same ids
    here keep our checkpoints id-compatible with Code Llama's. The new pieces are CONTROL pieces,
    which SentencePiece never produces from text (so "<PRE>" inside code stays text) and which
    decode to ""; the filler slots are CONTROL placeholders.

    tokenizer.json (byte-level BPE, SmolLM2) and tiktoken (Llama 3): the four tokens, named as
    Code Llama's, are special added tokens right after the existing ids (Code Llama's ids mean
    nothing to another vocabulary). `encode` never makes a special token from text, so data
    cannot forge them either; they decode to their names. tokenizer.json lists them in
    added_tokens, and tokenizer_config.json's added_tokens_decoder too when it has one, as
    transformers writes them; a tiktoken rank file has no room for them, so they go into
    tokenizer_config.json's added_tokens_decoder, after Llama 3's 256 specials.
    """
    src = Path(src)
    tok = Tokenizer(src)
    present = [p for p in INFILL_PIECES.values() if tok.piece_to_id(p) is not None]
    if present:
        raise ValueError(f"{tok.path} already has infilling pieces {present}")
    out_path = Path(out_path)
    if tok.kind == "sentencepiece":
        _extend_sentencepiece(tok, out_path)
        if tok.config_path:  # BOS/EOS names and add_bos travel with the tokenizer
            _atomic_write(out_path.parent / "tokenizer_config.json", tok.config_path.read_bytes())
        return out_path
    n = tok.vocab_size
    new = {n + k: piece for k, piece in enumerate(INFILL_PIECES.values())}
    entry = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    config = dict(tok.config)
    if tok.kind == "tokenizer.json":
        spec = json.loads(tok.path.read_text(encoding="utf-8"))
        spec["added_tokens"] = spec.get("added_tokens", []) + [
            {"id": i, "content": piece, **entry} for i, piece in new.items()]
        data = json.dumps(spec, ensure_ascii=False, indent=2).encode("utf-8")
    else:
        data = tok.path.read_bytes()
    if "added_tokens_decoder" in config or tok.kind == "tiktoken":
        config["added_tokens_decoder"] = {**config.get("added_tokens_decoder", {}), **{
            str(i): {"content": piece, **entry} for i, piece in new.items()}}
    _atomic_write(out_path, data)
    if config or tok.kind == "tiktoken":
        _atomic_write(out_path.parent / "tokenizer_config.json",
                      json.dumps(config, ensure_ascii=False, indent=2).encode("utf-8"))
    check = Tokenizer(out_path)
    if check.vocab_size != n + 4 or [getattr(check, f"{k}_id") for k in INFILL_PIECES] != [*new]:
        raise RuntimeError(f"{tok.path}: the extended tokenizer did not load as expected")
    return out_path


def _extend_sentencepiece(tok, out_path):
    import sentencepiece as spm
    n = tok.vocab_size
    size = -(-(n + INFILL_OFFSET + len(INFILL_PIECES)) // 16) * 16  # round up to a multiple of 16
    infill = {n + INFILL_OFFSET + k: p for k, p in enumerate(INFILL_PIECES.values())}
    # A ModelProto's pieces are its repeated field 1, and protobuf parsers concatenate repeated
    # fields wherever they appear, so appending encoded pieces to the file adds vocabulary
    # entries (no protobuf package needed). SentencePiece message: piece = 1 (string),
    # score = 2 (float), type = 3 (enum; 3 is CONTROL).
    extra = bytearray()
    for i in range(n, size):
        name = infill.get(i, f"<unused_{i}>").encode("utf-8")
        msg = (b"\x0a" + _proto_varint(len(name)) + name + b"\x15" + struct.pack("<f", 0.0)
               + b"\x18" + _proto_varint(3))
        extra += b"\x0a" + _proto_varint(len(msg)) + msg
    data = tok.path.read_bytes() + bytes(extra)
    check = spm.SentencePieceProcessor(model_proto=data)
    if check.get_piece_size() != size or any(check.id_to_piece(i) != p for i, p in infill.items()):
        raise RuntimeError(f"{tok.path}: the extended model did not load as expected")
    _atomic_write(out_path, data)


# ---- prompt layouts (shared by training and sampling) ----

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# Text the Llama 2 layout reserves; the reference refuses messages holding any (RECIPE.md sec. 4).
RESERVED_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>")
# SmolLM2-Instruct's chat template adds this system turn when the dialog has none.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def format_infill(tok, prefix, suffix, suffix_first=False):
    """Code Llama's infilling prompt (RECIPE.md sec. 2, "Inference layouts"); the model then
    writes the middle and stops at ▁<EOT>.
    PSM: [BOS, ▁<PRE>] + enc(prefix) + [▁<SUF>] + enc_infilling(suffix) + [▁<MID>]
    SPM: [BOS, ▁<PRE>, ▁<SUF>] + enc_infilling(suffix) + [▁<MID>] + enc(prefix)
    """
    missing = [p for k, p in INFILL_PIECES.items() if getattr(tok, f"{k}_id") is None]
    if missing:
        raise ValueError(f"tokenizer {tok.path} lacks the infilling pieces {missing}; "
                         "make one with data.extend_tokenizer")
    bos = [tok.bos_id] if tok.add_bos else []
    if suffix_first:
        return (bos + [tok.prefix_id, tok.suffix_id] + tok.encode_infilling(suffix)
                + [tok.middle_id] + tok.encode(prefix))
    return (bos + [tok.prefix_id] + tok.encode(prefix) + [tok.suffix_id]
            + tok.encode_infilling(suffix) + [tok.middle_id])


def _check_dialog(messages, roles=("user", "assistant")):
    """Messages are dicts with a str content: an optional system turn, then `roles` in turn."""
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"message {k} must be a dict with 'role' and a str 'content': {m!r}")
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise ValueError("the dialog has no user message")
    for k, m in enumerate(turns):
        if m["role"] != roles[k % 2]:
            raise ValueError(f"message {k + len(messages) - len(turns)} has role {m['role']!r}; "
                             f"expected {roles[k % 2]!r} (optional system, then user/assistant "
                             "alternating)")
    return turns


def chat_tokens(tok, messages):
    """Llama 2 chat layout (Code Llama - Instruct; RECIPE.md sec. 4) -> (ids, loss_mask).

    The system message is merged into the first user turn between <<SYS>> markers. Each
    (user, assistant) pair is BOS + "[INST] {user} [/INST] {answer} " + EOS, a final user turn
    BOS + "[INST] {user} [/INST]", each encoded as one text, as the reference does. loss_mask is
    True exactly on the answer tokens and their EOS: Llama 2's SFT trains on answers only.
    """
    turns = _check_dialog(messages)
    for m in messages:
        bad = [t for t in RESERVED_TAGS if t in m["content"]]
        if bad:
            raise ValueError(f"a {m['role']} message contains the reserved tags {bad}")
    turns = [dict(t) for t in turns]
    if messages[0]["role"] == "system":
        turns[0]["content"] = B_SYS + messages[0]["content"] + E_SYS + turns[0]["content"]
    ids, mask = [], []
    for k in range(0, len(turns), 2):
        prompt = f"{B_INST} {turns[k]['content'].strip()} {E_INST}"
        prompt_ids = tok.encode(prompt, bos=True)
        if k + 1 == len(turns):
            ids += prompt_ids
            mask += [False] * len(prompt_ids)
            break
        pair = tok.encode(f"{prompt} {turns[k + 1]['content'].strip()} ", bos=True, eos=True)
        # The answer starts where the pair's ids leave the prompt's ids (the same place, as
        # both tokenizers split before the space that opens the answer).
        n = 0
        while n < min(len(prompt_ids), len(pair)) and pair[n] == prompt_ids[n]:
            n += 1
        ids += pair
        mask += [False] * n + [True] * (len(pair) - n)
    return ids, mask


def format_chat(tok, messages):
    """The Llama 2 chat prompt for a dialog ending with a user turn: it ends after "[/INST]"."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("format_chat needs a dialog that ends with a user message")
    return chat_tokens(tok, messages)[0]


def _chatml_ids(tok):
    start, end = tok.piece_to_id("<|im_start|>"), tok.piece_to_id("<|im_end|>")
    if start is None or end is None:
        raise ValueError(f"tokenizer {tok.path} has no <|im_start|>/<|im_end|> tokens")
    return start, end


def chatml_tokens(tok, messages):
    """SmolLM2-Instruct's ChatML layout -> (ids, loss_mask), chat_tokens' counterpart: each message
    is "<|im_start|>{role}\\n{content}<|im_end|>\\n", its default system turn first when the dialog
    has none. loss_mask is True exactly on each assistant content and its <|im_end|> (the token
    generation stops at), as chat_tokens masks answers and their EOS."""
    _check_dialog(messages)
    start, end = _chatml_ids(tok)
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SMOLLM2_SYSTEM}] + list(messages)
    newline = tok.encode("\n")
    ids, mask = [], []
    for m in messages:
        body = tok.encode(f"{m['role']}\n{m['content']}")
        ids += [start] + body + [end] + newline
        if m["role"] != "assistant":
            mask += [False] * (len(body) + 2 + len(newline))
            continue
        # The answer starts where body leaves the header's ids (encoded as one text, as the
        # template is, so a token may straddle "\n" and the content: it counts as answer).
        header, n = tok.encode("assistant\n"), 0
        while n < min(len(header), len(body)) and body[n] == header[n]:
            n += 1
        mask += [False] * (1 + n) + [True] * (len(body) - n + 1) + [False] * len(newline)
    return ids, mask


def format_chatml(tok, messages):
    """SmolLM2-Instruct's ChatML prompt, as its chat template renders and tokenizes it:
    "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message (its default system turn first when
    the dialog has none), then "<|im_start|>assistant\\n". Contents are encoded as plain text."""
    _check_dialog(messages)
    if messages[-1]["role"] != "user":
        raise ValueError("format_chatml needs a dialog that ends with a user message")
    return chatml_tokens(tok, messages)[0] + [_chatml_ids(tok)[0]] + tok.encode("assistant\n")


def format_dialog(tok, messages):
    """The chat prompt in the tokenizer's own layout (tok.chat_format)."""
    if tok.chat_format == "chatml":
        return format_chatml(tok, messages)
    return format_chat(tok, messages)


def dialog_tokens(tok, messages):
    """(ids, loss_mask) of a whole dialog in the tokenizer's own layout, for instruction tuning."""
    return (chatml_tokens if tok.chat_format == "chatml" else chat_tokens)(tok, messages)


# ---- corpus ----
# Reading sources, tokenizing them once into shards, mixing sources by weight and packing documents
# into training sequences (Code Llama sec. 2.2, Table 1; RECIPE.md sec. 1).
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


def _write_atomic(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


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
    _write_atomic(base.with_suffix(".bin"), tokens.tofile)
    for suffix, array in ((".idx.npy", np.asarray(offsets, np.int64)),
                          (".lang.npy", np.asarray(langs, np.uint16))):
        _write_atomic(base.with_name(base.name + suffix), lambda p, a=array: _save_npy(p, a))
    stats = {"documents": len(langs), "tokens": int(offsets[-1]), "skipped": skipped,
             "examples": examples, "languages": list(names),
             "language_documents": np.bincount(np.asarray(langs, np.int64),
                                               minlength=len(names)).tolist()}
    _write_atomic(base.with_suffix(".json"), lambda p: p.write_text(json.dumps(stats)))
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
    _write_atomic(meta_path, lambda p: p.write_text(json.dumps(header, indent=1)))

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
    meta = {**header, "complete": True, "shards": shards,
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards), "skipped": skipped,
            "skipped_examples": examples, "languages": languages}
    _write_atomic(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1)))
    return meta


def summary(meta: dict) -> str:
    skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(meta["skipped"].items())) or "none"
    langs = ", ".join(f"{k or '?'} {v:,}" for k, v in sorted(meta["languages"].items(),
                                                            key=lambda kv: -kv[1])[:8])
    return (f"{meta['documents']:,} documents, {meta['tokens']:,} tokens in "
            f"{len(meta['shards'])} shards ({meta['dtype']}); skipped: {skipped}; "
            f"languages: {langs or 'none'}")


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
# (LESSONS.md item 7).
#
# Documents are packed back to back, BOS/EOS marking the boundaries; attention crosses them, as
# neither [P] nor [L2] mentions a block-diagonal mask (model.py has none; LESSONS.md item 8).
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
    """The plain transform: each document as BOS + tokens + EOS, every token a target (sec. 2.2)."""
    bos, eos = np.array([tok.bos_id]), np.array([tok.eos_id])

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
        """How many times each source has been seen: the "Epochs" column of Table 1 in [P]."""
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
# Dialogs (instruction tuning: Code Llama - Instruct, sec. 2.5; RECIPE.md sec. 4)
#
# A chat source is a .jsonl / .jsonl.gz file of {"messages": [{"role", "content"}, ...]} records:
# what self_instruct.py writes, and the common format of public instruction sets. It is read whole
# and each dialog is encoded once, in memory, in the tokenizer's own layout (dialog_tokens), with
# its loss mask: the answers and their end token only, as in Llama 2's SFT (Code Llama does not say;
# RECIPE.md sec. 4). Batches packs dialogs like documents but renders them with that mask, never
# through the stage's transform. A record is skipped, and counted by reason, when it is not JSON
# ("bad_json"), has no "messages" list ("no_messages"), holds a message that is not {"role": str,
# "content": str} ("bad_message"), breaks the turn order: an optional system message, then user
# and assistant alternating, ending with an answer ("bad_turns"), or holds a reserved tag such as
# [INST] or <<SYS>> that would forge a turn boundary ("reserved_tag"). A dialog longer than seq_len
# keeps its longest run of whole (user, answer) pairs that fits ("truncated"), or is dropped when
# its first pair alone does not fit ("too_long").

CHAT_LANG = "chat"


def is_dialogs(path) -> bool:
    """Whether `path` is a chat source: a .jsonl(.gz) file whose first record holds "messages"."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file() or not name.endswith((".jsonl", ".jsonl.gz")):
        return False
    with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:  # JSONDecodeError, or UnicodeDecodeError on bytes
                    raise ValueError(f"{path}:{lineno}: not a JSON record: {line[:60]!r}") from None
                return isinstance(record, dict) and "messages" in record
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
        turns = _check_dialog(messages)
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
# Fill-in-the-middle (Code Llama sec. 2.3; RECIPE.md sec. 2)
#
# A document is cut at two character positions into prefix / middle / suffix and rearranged so that
# the middle comes last: the model, trained left to right, learns to write a middle given both
# sides. The example starts exactly as `format_infill`'s prompt for the same cut (BOS when the
# tokenizer's prompts have one, which Code Llama's inference does; whether its FIM training did is
# UNCONFIRMED), so what the model sees at inference is what it was trained on (LESSONS.md item 1).
# It ends with <EOT>, which is always a target ([FIM] sec. 3: the model must learn to stop), then
# EOS, so that every document in the packed stream still ends as `bos_eos` ends it and the next
# document's BOS follows an EOS whatever the transform did. Every id is a target ([FIM] keeps the
# loss on all three parts; Code Llama is silent).
#
# "Only documents that are not cut across several model contexts" (sec. 2.3): an infilling example
# that cannot lie whole in one context is rendered plainly instead (its plain rendering is longer
# than seq_len, or the sentinels and the re-encoding of three parts push the example past it: a
# few documents near the limit), and one that can is placed whole in one context: the transform
# asks Batches for it (its third value, see "Mixtures and packing"), so when it does not fit in
# what is left of the current sequence, the rest is padding and it starts the next one. Packed
# back to back like any document, a third of the examples would be cut (measured on the standard
# library at 256 tokens), a PSM middle then often trained without its prefix in view. The other
# documents are packed back to back as in the other stages; `whole_docs=False` packs the examples
# that way too, for comparisons. Every choice is a function of (seed, document, stream position),
# so a resume makes the same ones (Batches seeds `rng` by position; a document gets new cuts each
# epoch).


def fim_example(tok, prefix, middle, suffix, suffix_first=False):
    """The ids of one infilling training example (RECIPE.md sec. 2, "Layouts"):
    PSM: [BOS, ▁<PRE>] + enc(prefix) + [▁<SUF>] + enc_infilling(suffix) + [▁<MID>]
         + enc_infilling(middle) + [▁<EOT>, EOS]
    SPM: [BOS, ▁<PRE>, ▁<SUF>] + enc_infilling(suffix) + [▁<MID>] + enc(prefix + middle)
         + [▁<EOT>, EOS]
    BOS is there when `format_infill` puts it (tok.add_bos). SPM is [FIM] App. D's "compatible"
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


# --------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize a data source once, into shards for training")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prepare", help="tokenize source files / JSONL / Parquet into shards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--data", nargs="+", required=True,
                   help="directories of source files, .jsonl(.gz) or .parquet files: one source")
    q.add_argument("--tokenizer", required=True, help="tokenizer file or checkpoint folder")
    q.add_argument("--out", required=True, help="folder for the shards")
    q.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizing processes")
    q.add_argument("--shard-mb", type=float, default=256, help="input megabytes per shard")
    q.add_argument("--ext", default=None,
                   help="comma-separated extensions to read from directories, e.g. py,pyi for "
                        "Python only; None: all in data.EXTENSIONS")
    q.add_argument("--text-field", nargs="+", default=["content", "text"],
                   help="JSONL/Parquet fields holding the text, the first present is used")
    q.add_argument("--max-file-bytes", type=int, default=MAX_FILE_BYTES)
    q.add_argument("--max-line-chars", type=int, default=MAX_LINE_CHARS)
    q.add_argument("--max-mean-line-chars", type=float, default=MAX_MEAN_LINE_CHARS)
    args = p.parse_args(argv)
    extensions = None
    if args.ext:
        wanted = {"." + e.strip().lstrip(".").lower() for e in args.ext.split(",")}
        unknown = wanted - set(EXTENSIONS)
        if unknown:
            p.error(f"--ext: unknown extension(s) {', '.join(sorted(unknown))}")
        extensions = {e: lang for e, lang in EXTENSIONS.items() if e in wanted}
    t0 = time.time()
    try:
        meta = prepare(args.data, args.tokenizer, args.out, workers=args.workers,
                       shard_mb=args.shard_mb, extensions=extensions, text_fields=args.text_field,
                       max_file_bytes=args.max_file_bytes, max_line_chars=args.max_line_chars,
                       max_mean_line_chars=args.max_mean_line_chars)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.out}: {summary(meta)} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
