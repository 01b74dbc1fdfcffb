"""Tokenizer and prompt layouts against their references: the sentencepiece library for Llama 2,
the HF `tokenizers` library for byte-level BPE (on real Python files), Code Llama's layouts built
by hand from Code Llama's reference code, SmolLM2's own chat template, and transformers for the
converted model."""
import base64
import copy
import json
import random
import re
import sysconfig
import time
from pathlib import Path

import pytest

from prompts import (SMOLLM2_SYSTEM, chat_tokens, format_chat, format_chatml, format_dialog,
                     format_infill)
from tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIALS, Tokenizer, bytes_to_unicode, extend_tokenizer

EDGE_CASES = [
    "", " ", "  leading", "trailing   ", "\t\tx = 1\r\n", "a\r\n\r\nb\n\n\n", "tabs\tand\t\tmore",
    "x = 12345 + 6.78e-9", "a  1", "a \t 12", "  \n  3", " 1 2  3   4", "0x1F 007 ½ ² ٣٤",
    "naïve café déjà vu", "日本語のテキスト、中文文本", "😀👍🏽 emoji 🇫🇷", "\u00a0\u2000\u3000 spaces",
    "it's we'll they've I'M", "def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "<PRE> <SUF> <MID> <EOT> </s> <s>",
    "\u200b\ufeffzero width", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
    # runs of spaces before a digit: SmolLM2's digit split leaves the run whole
    "x = [\n    18,\n        19]\n", "pat( ==  0.5", "[1,   2,\n#    1.", "\n    1\n",
]


def stdlib_texts(n, max_chars):
    """n Python files of the interpreter's standard library, chosen deterministically (whatever
    packages are installed: site-packages is left out)."""
    files = sorted(f for f in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")
                   if "site-packages" not in f.parts)
    random.Random(0).shuffle(files)
    texts = [f.read_text(encoding="utf-8", errors="replace")[:max_chars] for f in files[:n]]
    assert len(texts) == n
    return texts


# ---- Llama 2 / Code Llama (SentencePiece) ----

@pytest.fixture(scope="module")
def sp(llama2_tokenizer):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))


@pytest.fixture(scope="module")
def cl(codellama_tokenizer):
    return Tokenizer.from_pretrained(codellama_tokenizer)


def test_llama2_matches_sentencepiece(llama2_tokenizer, sp):
    tok = Tokenizer.from_pretrained(llama2_tokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, None)
    assert tok.add_bos and tok.chat_format == "llama2"
    assert [tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id] == [None] * 4
    for text in stdlib_texts(40, 4000) + EDGE_CASES:
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert tok.encode("hi", bos=True, eos=True) == [1] + sp.encode("hi") + [2]
    assert tok.piece_to_id("▁the") == sp.piece_to_id("▁the") and tok.piece_to_id("nope") is None
    # A folder holding the file loads the same tokenizer.
    assert Tokenizer.from_pretrained(llama2_tokenizer.parent).encode("x = 1") == sp.encode("x = 1")


def test_extend_tokenizer(llama2_tokenizer, codellama_tokenizer, cl, sp, tmp_path):
    assert cl.vocab_size == 32016
    assert (cl.prefix_id, cl.suffix_id, cl.middle_id, cl.eot_id) == (32007, 32008, 32009, 32010)
    assert [cl.id_to_piece(i) for i in range(32007, 32011)] == ["▁<PRE>", "▁<SUF>", "▁<MID>",
                                                                "▁<EOT>"]
    assert len({cl.id_to_piece(i) for i in range(32016)}) == 32016
    texts = stdlib_texts(20, 3000) + EDGE_CASES + [
        "<PRE>", " <PRE>", "▁<PRE>", "x <SUF> y <MID> z <EOT>", "<EOT><EOT>", "<unused_32000>"]
    for text in texts:
        ids = cl.encode(text)
        assert ids == sp.encode(text)  # the first 32,000 ids are Llama 2's, unchanged
        assert max(ids, default=0) < 32000
        assert cl.decode(ids) == sp.decode(ids)
    # Control pieces decode to nothing, like BOS and EOS do.
    assert cl.decode([32007]) == "" and cl.decode([32000, 32015]) == ""
    assert cl.decode(cl.encode("a") + [32010] + cl.encode("b")) == "a b"
    with pytest.raises(ValueError, match="already has infilling pieces"):
        extend_tokenizer(codellama_tokenizer, tmp_path / "again.model")
    assert sorted(p.name for p in codellama_tokenizer.parent.iterdir()) == ["tokenizer.model"]


def test_encode_infilling(cl, sp):
    assert cl.id_to_piece(cl.encode_infilling("return x")[0]) == "return"
    assert cl.id_to_piece(cl.encode("return x")[0]) == "▁return"
    for text in ["return x", "  indented\n", "\nnew line", " one space", "x", ""]:
        ids = cl.encode_infilling(text)
        assert ids == sp.encode("☺" + text)[2:]  # Code Llama's trick (its reference tokenizer)
        assert cl.decode_infilling(ids) == text


def test_format_infill_layouts(cl, sp):
    pre, suf = "def add(a, b):\n    ", "\n    return c\n"
    psm = [1, 32007] + sp.encode(pre) + [32008] + sp.encode("☺" + suf)[2:] + [32009]
    spm = [1, 32007, 32008] + sp.encode("☺" + suf)[2:] + [32009] + sp.encode(pre)
    assert format_infill(cl, pre, suf) == psm
    assert format_infill(cl, pre, suf, suffix_first=True) == spm


# ---- against transformers, an implementation of its own -----------------------------------------

def spaces_as_sentencepiece_cuts_them(text):
    """Runs of two or more spaces as tabs, and no space at the very start. transformers rebuilds
    Llama 2's SentencePiece model as an HF BPE, which cuts spaces otherwise there ("    return"
    -> "▁▁▁▁" "return", where SentencePiece, whose pieces Llama 2 and Code Llama were trained on,
    gives "▁▁▁" "▁return"; " 1" -> "▁" "1" rather than "▁▁" "1"): the known differences, all
    about spaces; everything else must agree."""
    return re.sub(r" {2,}", lambda m: "\t" * len(m.group()), text).lstrip(" ")


def transformers_tokenizer(folder):
    """AutoTokenizer on a folder this project wrote (a SentencePiece model is converted by
    transformers, which needs sentencepiece and protobuf: requirements-dev.txt)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder)


def assert_transformers_loads(folder, texts=("def f(x):\n\treturn x + 1\n", "naïve café 2024 ½",
                                              " one leading space", "")):
    """An exported folder's tokenizer loads with AutoTokenizer and encodes as ours does."""
    ours, theirs = Tokenizer.from_pretrained(folder), transformers_tokenizer(folder)
    for text in texts:
        ids = ours.encode(text)
        assert theirs(text, add_special_tokens=False).input_ids == ids, (folder, text)
        assert theirs.decode(ids) == ours.decode(ids)
    return theirs


@pytest.fixture(scope="module")
def hf_llama2(llama2_tokenizer, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf-llama2")
    Tokenizer.from_pretrained(llama2_tokenizer).save(folder)
    return transformers.LlamaTokenizer.from_pretrained(folder)


def real_texts():
    """Real code and text: standard-library source, prose with accents, CJK and emoji, numbers."""
    return stdlib_texts(40, 4000) + [t for t in EDGE_CASES if not re.search(r"</?s>", t)] + [
        "The café's crème brûlée costs 12.50 €, 3 × 4 = 12, π ≈ 3.14159.",
        "Ünïcödé ΑΒΓ абв עברית العربية हिन्दी ไทย 한국어", "1234567890 0.5 -7e10 0x1f 1_000",
        "\nleading newline", "trailing newline\n", "x" * 300]


def test_llama2_matches_transformers_fast(llama2_tokenizer, hf_llama2):
    """transformers' LlamaTokenizer (its own BPE implementation, converted from the model file)
    gives our ids on real text, and decodes our ids to our text."""
    tok = Tokenizer.from_pretrained(llama2_tokenizer)
    assert len(hf_llama2) == tok.vocab_size == 32000
    assert (hf_llama2.bos_token_id, hf_llama2.eos_token_id) == (tok.bos_id, tok.eos_id)
    for text in real_texts():
        ids = tok.encode(text)
        assert hf_llama2.decode(ids) == tok.decode(ids), text[:80]
        text = spaces_as_sentencepiece_cuts_them(text)
        assert hf_llama2(text, add_special_tokens=False).input_ids == tok.encode(text), text[:80]
    # a known difference, pinned: ours is SentencePiece's cut
    assert tok.encode("x\n    return y") == [921, 13, 1678, 736, 343]
    assert hf_llama2("x\n    return y", add_special_tokens=False).input_ids == [
        921, 13, 268, 2457, 343]


def test_llama2_matches_transformers_slow(llama2_tokenizer):
    """transformers' SentencePiece-backed (slow) tokenizer, spaces included."""
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_pretrained(llama2_tokenizer)
    slow = transformers.SentencePieceBackend(vocab_file=str(llama2_tokenizer), legacy=True)
    for text in real_texts():
        assert slow.encode(text, add_special_tokens=False) == tok.encode(text), text[:80]


@pytest.fixture(scope="module")
def hf_codellama(codellama_tokenizer, tmp_path_factory):
    """transformers' CodeLlamaTokenizer on our extended model: its own infilling layouts."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf-codellama")
    Tokenizer.from_pretrained(codellama_tokenizer).save(folder)
    return transformers.CodeLlamaTokenizer.from_pretrained(folder)


# suffixes that start with one space: transformers 5's CodeLlamaTokenizer puts a "▁" before every
# suffix, right only where the suffix starts with a space (the test after this one covers others)
INFILL_PAIRS = [("def add(a, b):\n    ", " return c\n"), ("x = 1", " y"),
                ("import os\n\n\ndef main():\n\t", " print(os.getcwd())\n\nmain()\n"),
                ("a", " b"), ("# café ½\n", " π = 3.14\n")]


def test_infilling_ids_and_layouts_match_transformers(cl, hf_codellama):
    # Code Llama's released ids: ▁<PRE> 32007, ▁<SUF> 32008, ▁<MID> 32009, ▁<EOT> 32010, in a
    # vocabulary padded to 32,016 (the 16 ids from 32,000 on)
    pieces = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
    assert hf_codellama.convert_tokens_to_ids(pieces) == [32007, 32008, 32009, 32010]
    assert [cl.prefix_id, cl.suffix_id, cl.middle_id, cl.eot_id] == [32007, 32008, 32009, 32010]
    assert cl.vocab_size == 32016 and [cl.id_to_piece(i) for i in range(32007, 32011)] == pieces
    for prefix, suffix in INFILL_PAIRS:
        for spm in (False, True):
            theirs = hf_codellama.encode(prefix, suffix=suffix, suffix_first=spm)
            assert format_infill(cl, prefix, suffix, suffix_first=spm) == theirs, (prefix, suffix)


@pytest.mark.parametrize("suffix", ["return c\n", "\n    return c\n", "  two", "\tz", "x"])
def test_infilling_suffix_has_no_implicit_space(cl, suffix):
    """The suffix is encoded as a continuation, without SentencePiece's leading "▁" (Code Llama's
    reference implementation): its pieces spell the suffix and nothing more."""
    for spm in (False, True):
        ids = format_infill(cl, "a = 1\n", suffix, suffix_first=spm)
        body = ids[ids.index(cl.suffix_id) + 1:ids.index(cl.middle_id)]
        spelled = "".join(cl.id_to_piece(i) for i in body)
        assert spelled == suffix.replace(" ", "▁").replace("\n", "<0x0A>").replace("\t", "<0x09>")


def test_format_infill_without_pieces(llama2_tokenizer):
    with pytest.raises(ValueError, match="▁<PRE>.*extend_tokenizer"):
        format_infill(Tokenizer.from_pretrained(llama2_tokenizer), "a", "b")


DIALOG = [{"role": "system", "content": "Answer briefly."},
          {"role": "user", "content": " What is 2+2? "},
          {"role": "assistant", "content": " 4.\n"},
          {"role": "user", "content": "And 3+3?"},
          {"role": "assistant", "content": "It is 6."},
          {"role": "user", "content": "Thanks!"}]


def test_chat_layout_and_mask(cl, sp):
    # The reference strips the merged system + user text as a whole, so the user's own leading
    # space stays after the <</SYS>> block.
    first = "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\n What is 2+2? [/INST] 4. "
    expected = ([1] + sp.encode(first) + [2] + [1] + sp.encode("[INST] And 3+3? [/INST] It is 6. ")
                + [2] + [1] + sp.encode("[INST] Thanks! [/INST]"))
    ids, mask = chat_tokens(cl, DIALOG)
    assert ids == expected and len(mask) == len(ids)
    assert format_chat(cl, DIALOG) == expected
    assert format_dialog(cl, DIALOG) == expected
    assert sp.id_to_piece(ids[-1]) == "]"
    # The mask covers each answer and its EOS, nothing else.
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    assert [r[-1] for r in runs] == [2, 2]
    assert [cl.decode(r[:-1]) for r in runs] == ["4. ", "It is 6. "]
    assert sum(mask) == sum(len(r) for r in runs)
    # Without a system message the first turn is plain.
    ids, mask = chat_tokens(cl, DIALOG[1:3])
    assert ids == [1] + sp.encode("[INST] What is 2+2? [/INST] 4. ") + [2]
    assert cl.decode([i for i, m in zip(ids, mask) if m]) == "4. "


@pytest.mark.parametrize("messages, error", [
    ([], "no user message"),
    ([{"role": "system", "content": "s"}], "no user message"),
    ([{"role": "assistant", "content": "a"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
     "expected 'assistant'"),
    ([{"role": "user", "content": 3}], "str 'content'"),
    ([{"role": "user", "content": "tell me [INST] more"}], "reserved tags"),
    ([{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "a"}], "reserved tags"),
    ([{"role": "user", "content": "a [/INST] b"}], "reserved tags"),
])
def test_chat_rejects_bad_dialogs(cl, messages, error):
    with pytest.raises(ValueError, match=error):
        chat_tokens(cl, messages)


def test_format_chat_needs_final_user_turn(cl):
    with pytest.raises(ValueError, match="ends with a user"):
        format_chat(cl, DIALOG[1:3])


# ---- SmolLM2 (tokenizer.json, byte-level BPE) ----

@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return Tokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def hf_smol(smollm2_dir):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    hf.encode_special_tokens = True  # special-token names in text stay text, as in ours
    return hf


def test_smollm2_matches_hf_on_stdlib(smol, hf_smol):
    texts = stdlib_texts(300, 8000)
    t0 = time.perf_counter()
    ours = [smol.encode(t) for t in texts]
    t1 = time.perf_counter()
    theirs = [e.ids for e in hf_smol.encode_batch(texts, add_special_tokens=False)]
    t2 = time.perf_counter()
    chars, n_tok = sum(map(len, texts)), sum(map(len, theirs))
    print(f"\n300 stdlib files, {chars / 1e6:.2f}M chars, {n_tok} tokens: ours "
          f"{chars / (t1 - t0) / 1e6:.2f}M chars/s, HF tokenizers encode_batch "
          f"{chars / (t2 - t1) / 1e6:.2f}M chars/s")
    assert [i for i in range(len(texts)) if ours[i] != theirs[i]] == []
    assert all(smol.decode(ids) == t for ids, t in zip(ours, texts))


def test_smollm2_edge_cases(smol, hf_smol):
    for text in EDGE_CASES:
        ids = smol.encode(text)
        assert ids == hf_smol.encode(text, add_special_tokens=False).ids, text
        assert smol.decode(ids) == text == hf_smol.decode(ids, skip_special_tokens=False)
    # Digits are isolated; a special-token name inside text is text (HF with its defaults
    # would turn it into the control id, a way for data to forge a turn boundary).
    assert [smol.id_to_piece(i) for i in smol.encode(" 2024")] == ["Ġ", "2", "0", "2", "4"]
    assert 1 not in smol.encode("<|im_start|>") and smol.piece_to_id("<|im_start|>") == 1
    assert smol.decode([1, 2]) == "<|im_start|><|im_end|>"


def test_smollm2_missing_bytes_are_dropped_as_hf_does(smol, hf_smol):
    b2u = bytes_to_unicode()
    assert smol.piece_to_id(b2u[0x04]) is None  # SmolLM2's vocabulary lacks some bytes
    for text in ["a\x04b", "\x04\x06\x13", "x\U00040000y", "\x04 1 \x1d"]:
        assert smol.encode(text) == hf_smol.encode(text, add_special_tokens=False).ids
    assert smol.decode(smol.encode("a\x04b")) == "ab"


def test_smollm2_config(smol):
    assert (smol.vocab_size, smol.bos_id, smol.eos_id, smol.pad_id) == (49152, 1, 2, 2)
    assert not smol.add_bos and smol.chat_format == "chatml"
    assert [smol.prefix_id, smol.suffix_id, smol.middle_id, smol.eot_id] == [None] * 4
    assert smol.encode_infilling(" x") == smol.encode(" x")
    with pytest.raises(ValueError, match="lacks the infilling pieces"):
        format_infill(smol, "a", "b")


def test_smollm2_chatml_matches_its_template(smol, smollm2_dir, hf_smol):
    jinja2 = pytest.importorskip("jinja2")
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(cfg["chat_template"])
    # With its defaults, HF reads the rendered template's markers as the special tokens.
    hf = type(hf_smol).from_file(str(smollm2_dir / "tokenizer.json"))
    for messages in [DIALOG[1:4], DIALOG[:4], [{"role": "user", "content": " spaces \n"}]]:
        text = template.render(messages=messages, add_generation_prompt=True)
        assert format_chatml(smol, messages) == hf.encode(text, add_special_tokens=False).ids
        assert format_dialog(smol, messages) == format_chatml(smol, messages)
    assert SMOLLM2_SYSTEM in smol.decode(format_chatml(smol, DIALOG[1:2]))


def _hf_and_ours(spec, tmp_path, name):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / name
    path.mkdir()
    (path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    hf = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    hf.encode_special_tokens = True
    return Tokenizer.from_pretrained(path), hf


def _byte_level(**kw):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": True, **kw}


def _split(pattern, behavior, invert=False):
    return {"type": "Split", "pattern": pattern, "behavior": behavior, "invert": invert}


PRE_TOKENIZERS = {
    "gpt2_prefix_space": _byte_level(add_prefix_space=True),
    "digits_runs": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False}, _byte_level()]},
    "digits_prefix_space": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(add_prefix_space=True)]},
    "llama3_split": {"type": "Sequence", "pretokenizers": [
        _split({"Regex": LLAMA3_PATTERN}, "Isolated"), _byte_level(use_regex=False)]},
    **{f"split_{b}_{inv}": {"type": "Sequence", "pretokenizers": [
        _split({"String": " "} if inv else {"Regex": r"\s+"}, b, inv),
        _byte_level(use_regex=False)]}
       for b, inv in [("Removed", False), ("MergedWithPrevious", True),
                      ("MergedWithNext", False), ("Contiguous", True)]},
    "two_splits": {"type": "Sequence", "pretokenizers": [
        _split({"Regex": r"[\r\n]+"}, "Isolated"), _split({"Regex": r"\p{N}{1,3}"}, "Isolated"),
        _byte_level()]},
}


@pytest.fixture(scope="module")
def smol_spec(smollm2_dir):
    return json.loads((smollm2_dir / "tokenizer.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(PRE_TOKENIZERS))
def test_pre_tokenizer_variants_match_hf(smol_spec, tmp_path, name):
    """The stage-by-stage pre-tokenizer on SmolLM2's vocabulary under other pre_tokenizer specs."""
    ours, hf = _hf_and_ours(dict(smol_spec, pre_tokenizer=PRE_TOKENIZERS[name]), tmp_path, name)
    for text in stdlib_texts(10, 1500) + EDGE_CASES + ["x   1", "a-b--c", "  ", "1  2 \n3"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, (name, text)


def test_tokenizer_json_options_match_hf(smol_spec, tmp_path):
    """NFKC normalizer, unk_token for missing bytes, non-special added tokens, ignore_merges,
    and a TemplateProcessing BOS."""
    spec = copy.deepcopy(smol_spec)
    spec["normalizer"] = {"type": "NFKC"}
    spec["model"]["unk_token"] = "<|endoftext|>"
    spec["model"]["ignore_merges"] = True
    spec["added_tokens"].append({"id": 49152, "content": "<tool>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False,
                                 "special": False})
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [], "special_tokens": {}}
    ours, hf = _hf_and_ours(spec, tmp_path, "options")
    assert ours.add_bos and ours.bos_id == 1 and ours.vocab_size == 49153
    for text in stdlib_texts(10, 1500) + EDGE_CASES + ["ﬁne ①②", "a\x04b", "x<tool>y <tool>"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    assert 49152 in ours.encode("<tool>") and ours.decode(ours.encode("a<tool>")) == "a<tool>"


# ---- tiktoken base64-rank file (Llama 3 format) ----

def tiktoken_ranks(smol_spec):
    """(ranks, merges, rank-file lines) of a Llama 3-style rank file made of SmolLM2's BPE:
    every byte, then each merge's token in order."""
    u2b = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    merges = []
    for a, b in smol_spec["model"]["merges"]:
        token = bytes(u2b[c] for c in a + b)
        if token not in ranks:
            ranks[token] = len(ranks)
            merges.append([a, b])
    return ranks, merges, [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]


def test_tiktoken_file(smol, smol_spec, tmp_path):
    """A rank file built from SmolLM2's merges (every byte, then each merge's token in order),
    checked against HF tokenizers running the same BPE the way Llama 3's HF conversion does."""
    tokenizers = pytest.importorskip("tokenizers")
    b2u = bytes_to_unicode()
    ranks, merges, lines = tiktoken_ranks(smol_spec)
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tok = Tokenizer.from_pretrained(tmp_path)
    n = len(ranks)
    assert tok.kind == "tiktoken" and tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (n, n + 1, True)
    assert tok.piece_to_id("<|eot_id|>") == n + 9
    assert tok.id_to_piece(n + 255) == LLAMA3_SPECIALS[-1]

    vocab = {"".join(b2u[c] for c in t): r for t, r in ranks.items()}
    ref = {"version": "1.0", "added_tokens": [
        {"id": n + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for i, s in enumerate(LLAMA3_SPECIALS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            _split({"Regex": LLAMA3_PATTERN}, "Isolated"), _byte_level(use_regex=False)]},
        "post_processor": None, "decoder": _byte_level(),
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges}}
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "ref.json"))
    hf.encode_special_tokens = True
    for text in stdlib_texts(30, 3000) + EDGE_CASES:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text
    assert tok.encode("<|begin_of_text|>x", bos=True)[:2] == [n, tok.encode("<|")[0]]

    # A rank file lacking some bytes loads and drops them instead of crashing tiktoken.
    kept = [line for line in lines if base64.b64decode(line.split()[0]) not in (b"\x04", b"\x05")]
    (tmp_path / "gaps").mkdir()
    (tmp_path / "gaps/tokenizer.model").write_text(
        "\n".join(f"{line.split()[0]} {r}" for r, line in enumerate(kept)) + "\n")
    gaps = Tokenizer.from_pretrained(tmp_path / "gaps/tokenizer.model")
    assert gaps.decode(gaps.encode("a\x04b\x05c")) == "abc"


# ---- the infilling tokens added to byte-level vocabularies (extend_tokenizer) ----

INFILL_NAMES = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
FORGERIES = ["<PRE>", " <PRE>", "▁<PRE>", "x ▁<SUF> y ▁<MID> z ▁<EOT>", "<EOT><EOT>"]


def check_extended(ext, old, first_id, texts):
    """The four tokens at first_id.., text encoded exactly as before (names stay text), the
    layouts of format_infill, and infilling examples that decode to their parts."""
    from train_infill import fim_example
    n = first_id
    assert ext.vocab_size == old.vocab_size + 4
    assert [ext.prefix_id, ext.suffix_id, ext.middle_id, ext.eot_id] == [n, n + 1, n + 2, n + 3]
    assert [ext.id_to_piece(i) for i in range(n, n + 4)] == INFILL_NAMES
    for text in texts + FORGERIES:
        ids = ext.encode(text)
        assert ids == old.encode(text) and not set(ids) & {n, n + 1, n + 2, n + 3}, text
    bos = [ext.bos_id] if ext.add_bos else []
    pre, suf = "def add(a, b):\n    c", " = a + b\n    return c\n"
    # No implicit leading space to drop: the suffix is encoded as the plain text it is.
    assert format_infill(ext, pre, suf) == bos + [n] + ext.encode(pre) + [n + 1] + \
        ext.encode(suf) + [n + 2]
    assert format_infill(ext, pre, suf, suffix_first=True) == bos + [n, n + 1] + \
        ext.encode(suf) + [n + 2] + ext.encode(pre)
    rng = random.Random(0)
    head = ext.decode(bos)
    for text in texts:
        a, b = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        pre, mid, suf = text[:a], text[a:b], text[b:]
        psm = fim_example(ext, pre, mid, suf)
        assert psm[-2:] == [n + 3, ext.eos_id]
        tail = "▁<EOT>" + ext.decode([ext.eos_id])
        assert ext.decode(psm) == f"{head}▁<PRE>{pre}▁<SUF>{suf}▁<MID>{mid}{tail}"
        spm = fim_example(ext, pre, mid, suf, suffix_first=True)
        assert ext.decode(spm) == f"{head}▁<PRE>▁<SUF>{suf}▁<MID>{pre}{mid}{tail}"
        m = psm.index(n + 2)
        assert ext.decode_infilling(psm[m + 1:-2]) == mid


def test_extend_smollm2_tokenizer_json(smollm2_dir, smol, tmp_path):
    """SmolLM2's byte-level BPE (49,152 ids) gets the four tokens as added special tokens at
    49152-49155; the folder loads in transformers with them."""
    transformers = pytest.importorskip("transformers")
    out = extend_tokenizer(smollm2_dir / "tokenizer.json", tmp_path / "ext" / "tokenizer.json")
    assert sorted(p.name for p in out.parent.iterdir()) == ["tokenizer.json",
                                                            "tokenizer_config.json"]
    ext = Tokenizer.from_pretrained(out.parent)
    assert (ext.bos_id, ext.eos_id, ext.add_bos) == (smol.bos_id, smol.eos_id, smol.add_bos)
    texts = stdlib_texts(20, 2000) + EDGE_CASES
    check_extended(ext, smol, 49152, texts)
    with pytest.raises(ValueError, match="already has infilling pieces"):
        extend_tokenizer(out, tmp_path / "again.json")
    hf = transformers.AutoTokenizer.from_pretrained(out.parent)
    assert len(hf) == 49156
    assert hf.convert_tokens_to_ids(INFILL_NAMES) == [49152, 49153, 49154, 49155]
    for text in texts + FORGERIES:  # transformers, told to, also keeps the names as text
        assert hf(text, split_special_tokens=True).input_ids == ext.encode(text), text
    ids = format_infill(ext, "x = ", "\ny = 2\n")
    assert hf.decode(ids) == ext.decode(ids) == "▁<PRE>x = ▁<SUF>\ny = 2\n▁<MID>"
    assert hf.decode(ids, skip_special_tokens=True) == "x = \ny = 2\n"


def test_extend_tiktoken_file(smol_spec, tmp_path):
    """A Llama 3-style rank file: the tokens go after its 256 specials, named in the
    tokenizer_config.json written beside the (unchanged) rank file."""
    _, _, lines = tiktoken_ranks(smol_spec)
    (tmp_path / "src").mkdir()
    (tmp_path / "src/tokenizer.model").write_text("\n".join(lines) + "\n")
    old = Tokenizer.from_pretrained(tmp_path / "src")
    out = extend_tokenizer(old.path, tmp_path / "ext/tokenizer.model")
    assert out.read_bytes() == old.path.read_bytes()
    cfg = json.loads((out.parent / "tokenizer_config.json").read_text())
    n = len(lines) + 256
    assert {int(i): v["content"] for i, v in cfg["added_tokens_decoder"].items()} == \
        dict(zip(range(n, n + 4), INFILL_NAMES))
    ext = Tokenizer.from_pretrained(out)
    assert ext.kind == "tiktoken" and ext.bos_id == old.bos_id and ext.add_bos
    check_extended(ext, old, n, stdlib_texts(10, 2000) + EDGE_CASES)
    cfg["added_tokens_decoder"] = {str(n + 1): cfg["added_tokens_decoder"][str(n + 1)]}
    (out.parent / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"added token id {n + 1} leaves a gap"):
        Tokenizer.from_pretrained(out)


def test_encode_infilling_skips_byte_levels_prefix_space(smol, smol_spec, tmp_path):
    """With add_prefix_space, a byte-level BPE puts a space before every text that lacks one: the
    one implicit space of that format, left out of suffixes and middles as Code Llama's ☺ trick
    leaves out SentencePiece's."""
    ours, hf = _hf_and_ours(dict(smol_spec, pre_tokenizer=_byte_level(add_prefix_space=True)),
                            tmp_path, "prefix_space")
    for text in ["return x", "  indented\n", "x", "\nnew line", ""]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids
        spaced = text if text.startswith(" ") or not text else " " + text
        assert ours.decode(ours.encode(text)) == spaced
        ids = ours.encode_infilling(text)
        assert ours.decode_infilling(ids) == text and ids == smol.encode(text)


def test_bad_files_raise_clear_errors(tmp_path):
    (tmp_path / "bad.model").write_text("QUJD 0\nnot-base64 1\n")
    with pytest.raises(ValueError, match=r"bad.model:2"):
        Tokenizer.from_pretrained(tmp_path / "bad.model")
    (tmp_path / "junk.model").write_bytes(b"\x00\x01junk")
    with pytest.raises(ValueError, match="junk.model"):
        Tokenizer.from_pretrained(tmp_path / "junk.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_extend_a_hub_smollm2_folder(smollm2_dir, tmp_path):
    """The Hub's SmolLM2 folder names GPT2Tokenizer, which transformers 5 rebuilds with GPT-2's
    pre-tokenizer (no digit split); the extended folder tokenizes in transformers as ours does."""
    transformers = pytest.importorskip("transformers")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    (hub / "tokenizer_config.json").write_text(json.dumps({**config,
                                                           "tokenizer_class": "GPT2Tokenizer"}))
    out = extend_tokenizer(hub / "tokenizer.json", tmp_path / "ext" / "tokenizer.json")
    ours = Tokenizer.from_pretrained(out.parent)
    hf = transformers.AutoTokenizer.from_pretrained(out.parent)
    for text in ["#  0x0", "x = [\n    18,\n        19]\n", "a ½ b"] + EDGE_CASES[-4:]:
        assert hf(text, split_special_tokens=True).input_ids == ours.encode(text), text


def test_save_copies_files(smol, cl, tmp_path):
    smol.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["tokenizer.json",
                                                                  "tokenizer_config.json"]
    assert Tokenizer.from_pretrained(tmp_path / "a").encode("x = 1") == smol.encode("x = 1")
    # The Hub's SmolLM2 names GPT2Tokenizer, which transformers 5 rebuilds with GPT-2's own
    # pre-tokenizer (" ½", "#  0" cut otherwise); the converted folder names the generic class
    assert_transformers_loads(tmp_path / "a", ["def f(x):\n\treturn x + 1\n", "naïve café 2024",
                                               " one leading space", "", "a ½ b", "#  0x0"])
    cl.save(tmp_path / "b")
    assert Tokenizer.from_pretrained(tmp_path / "b").eot_id == 32010


# ---- the converted SmolLM2 checkpoint ----

def test_smollm2_folder_chats_in_transformers(smollm2_dir, smol):
    """The converted weights (q/k rows back in HF's rotate-half order) answer sensibly."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["rope_theta"] == 100000.0
    assert cfg["vocab_size"] == 49152
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for text in ["x = 12345 + 6", "<|im_start|>", " é\r\n"]:  # no BOS added, digits isolated
        assert hf_tok(text, split_special_tokens=True).input_ids == smol.encode(text)
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    prompt = format_chatml(smol, [{"role": "user", "content": "What is the capital of France?"}])
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    answer = smol.decode(out[0, len(prompt):].tolist())
    assert "Paris" in answer, answer
