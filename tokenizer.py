"""The tokenizer: one interface over the three tokenizer files a Llama-family checkpoint holds.

    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained("../shared/data/llama2/tokenizer.model")  # or a folder
    ids = tok.encode("def add(a, b):", bos=True); text = tok.decode(ids)

The files, all behind one interface:
- SentencePiece `tokenizer.model` (Llama 2, Code Llama), run by the sentencepiece library;
- tiktoken's base64-rank `tokenizer.model` (Llama 3), run by tiktoken;
- HF `tokenizer.json` with a byte-level BPE model (SmolLM2, GPT-2 style), run by tiktoken too, with
  ids equal to those of the HF `tokenizers` library.
Text is always encoded as plain text: a special token's name inside a code file ("<|im_start|>",
"<PRE>", "</s>") is never turned into the special id, so data cannot forge control tokens.
`extend_tokenizer` adds Code Llama's four infilling tokens to any of the three.
"""
import base64
import json
import re
import struct
import unicodedata
from pathlib import Path

import regex  # a tiktoken dependency; has the \p{L} classes that HF's pre-tokenizers use

from common import write_atomic

# Code Llama's infilling pieces (sec. 2.3; the names its reference tokenizer looks up).
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
        # Code Llama's infilling tokens (sec. 2.3); None where the vocabulary lacks them.
        self.prefix_id = self.piece_to_id(INFILL_PIECES["prefix"])
        self.suffix_id = self.piece_to_id(INFILL_PIECES["suffix"])
        self.middle_id = self.piece_to_id(INFILL_PIECES["middle"])
        self.eot_id = self.piece_to_id(INFILL_PIECES["eot"])

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
        self.add_bos = True  # Llama 2 / Code Llama prompts start with BOS (Meta's reference code)
        # Code Llama's trick to drop the implicit leading space (its reference tokenizer): encode a
        # dummy "☺" in front, then drop the ids of the dummy ("▁", "☺" in Llama's vocabulary).
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
        self._added_ids = frozenset(added.values())
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
        sec. 2.3 and its reference code: the suffix and middle are pieces of a line, not the
        start of a text). SentencePiece prepends "▁" to every text: Code Llama encodes a dummy
        "☺" in front and drops its ids. A byte-level BPE encodes exactly the bytes it is given,
        so nothing replaces that trick: its one implicit space is the ByteLevel pre-tokenizer's
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

    def continuation(self, prompt_ids):
        """ids generated after `prompt_ids` -> their text. They are decoded behind the last few
        prompt ids and that part's text is dropped: SentencePiece drops the space of a piece that
        opens a text ("▁return" alone decodes to "return"), so a seam's space comes out right."""
        tail = [int(i) for i in prompt_ids[-8:]]
        n = len(self.decode(tail))
        return lambda ids: self.decode(tail + [int(i) for i in ids])[n:]

    def token_bytes(self, i):
        """The bytes token i stands for inside a text; b"" for special, control and added tokens,
        which no text encodes to (what token healing matches a backed-up token against)."""
        i = int(i)
        if self.kind == "sentencepiece":
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                return b""
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):  # byte fallback: "<0x0A>"
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        return b"" if i in self._added_ids else self._id_to_bytes[i]

    @property
    def start_ids(self):
        """The ids every text starts with, document, infilling example or prompt alike: [BOS]
        where this tokenizer's prompts carry one (add_bos: Llama 2's, whose infilling prompts
        Code Llama's reference code starts with BOS before <PRE>), else [] (SmolLM2's
        tokenizer.json, whose texts start with their first token). One rule, so that what the
        model trains on starts as what it is prompted with."""
        return [self.bos_id] if self.add_bos and self.bos_id is not None else []

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
                write_atomic(out_dir / dst, Path(src).read_bytes())
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
    32,016, with ▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT> at 32007-32010 (the released
    tokenizer_config.json). The same ids here keep our checkpoints id-compatible with Code
    Llama's. The new pieces are CONTROL pieces, which SentencePiece never produces from text (so
    "<PRE>" inside code stays text) and which decode to ""; the filler slots are CONTROL
    placeholders.

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
            write_atomic(out_path.parent / "tokenizer_config.json", tok.config_path.read_bytes())
        return out_path
    n = tok.vocab_size
    new = {n + k: piece for k, piece in enumerate(INFILL_PIECES.values())}
    entry = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    config = dict(tok.config)
    if tok.kind == "tokenizer.json":
        # transformers 5 rebuilds a "GPT2Tokenizer" with GPT-2's own pre-tokenizer, dropping the
        # file's (SmolLM2's digit split: "#  0" becomes "#", " ", " 0"): the generic class runs
        # tokenizer.json as written, as training here did and as transformers 4 does.
        if "tokenizer_class" in config:
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        spec = json.loads(tok.path.read_text(encoding="utf-8"))
        spec["added_tokens"] = spec.get("added_tokens", []) + [
            {"id": i, "content": piece, **entry} for i, piece in new.items()]
        data = json.dumps(spec, ensure_ascii=False, indent=2).encode("utf-8")
    else:
        data = tok.path.read_bytes()
    if "added_tokens_decoder" in config or tok.kind == "tiktoken":
        config["added_tokens_decoder"] = {**config.get("added_tokens_decoder", {}), **{
            str(i): {"content": piece, **entry} for i, piece in new.items()}}
    write_atomic(out_path, data)
    if config or tok.kind == "tiktoken":
        write_atomic(out_path.parent / "tokenizer_config.json",
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
    write_atomic(out_path, data)
