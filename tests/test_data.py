"""data.py's corpus part: reading sources (bad files counted, never a crash), tokenizing into
shards that give each document's exact text back, and the batch stream: a pure function of
(data, seed, step), the same for any number of ranks, resumable from a few integers, packed with
BOS/EOS."""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import STDLIB
from data import IGNORE, Batches, Corpus, Tokenizer, prepare, summary

TOKENIZER = Path(__file__).resolve().parents[2] / "shared/data/llama2/tokenizer.model"

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"needs {TOKENIZER}")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(TOKENIZER)


GOOD = {
    "a.py": "def add(a, b):\n    return a + b\n",
    "pkg/b.py": "import os\n\n\nclass B:\n    '''Docstring, ünïcödé, 世界.'''\n    x = 1\r\n",
    "pkg/c.js": "function f(x) {\n  return x * 2;\n}\n",
    "notes.md": "# Notes\n\n" + "A long line of prose. " * 80 + "\n",  # prose: no line filter
}
BAD = {  # file -> (content, the reason it is skipped)
    "binary.py": (b"\x00\x01\x02ELF", "binary"),
    "latin1.py": ("x = 'caf\xe9'\n".encode("latin-1"), "invalid_utf8"),
    "empty.py": (b"", "empty"),
    "blank.py": (b"\n   \n\t\n", "empty"),
    "huge.py": (b"x = 1\n" * 1000, "too_large"),
    "min.js": (b"var a=1;" * 300, "minified"),  # one 2,400-character line
    "wide.py": (b"x = '" + b"y" * 150 + b"'\n", "minified"),  # mean line length over 100
    "spm.py": ("s = '\u2581'\n".encode(), "no_roundtrip"),  # SentencePiece reads U+2581 as a space
}


def write_tree(root: Path):
    for name, text in GOOD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8", newline="")
    for name, (raw, _) in BAD.items():
        (root / name).write_bytes(raw)
    (root / "ignored.xyz").write_text("not a known extension")
    (root / ".git").mkdir()
    (root / ".git" / "hook.py").write_text("print('hidden folders are not read')\n")
    return root


def texts(corpus: Corpus, tok) -> list[str]:
    return [tok.decode(corpus.tokens(d).tolist()) for d in range(corpus.n_docs)]


def test_prepare_directory_counts_bad_files_and_gives_exact_text_back(tmp_path, tok):
    src = write_tree(tmp_path / "src")
    meta = prepare([src], TOKENIZER, tmp_path / "out", workers=2, shard_mb=0, max_file_bytes=4000,
                   progress=False)
    reasons = [r for _, r in BAD.values()]
    assert meta["skipped"] == {r: reasons.count(r) for r in set(reasons)}
    assert meta["documents"] == len(GOOD)
    assert meta["languages"] == {"python": 2, "javascript": 1, "markdown": 1}
    corpus = Corpus(tmp_path / "out")
    # files in sorted path order, each text exactly as on disk (\r\n and all)
    assert texts(corpus, tok) == [GOOD[k] for k in sorted(GOOD)]
    assert [corpus.lang(d) for d in range(corpus.n_docs)] == ["python", "markdown", "python",
                                                              "javascript"]
    assert corpus.meta["dtype"] == "uint16" and corpus.n_tokens == sum(
        len(tok.encode(t)) for t in GOOD.values())
    assert "binary.py" in meta["skipped_examples"]["binary"][0]


def test_prepare_rerun_skips_finished_shards_and_refuses_other_inputs(tmp_path):
    src = write_tree(tmp_path / "src")
    out = tmp_path / "out"
    meta = prepare([src], TOKENIZER, out, workers=1, shard_mb=0, progress=False)
    shards = sorted(out.glob("shard-*.bin"))
    assert len(shards) == len(GOOD) + len(BAD) - 1  # a file per shard, but empty.py shares one
    # an interrupted run: one shard missing, meta not complete
    (out / "shard-00002.json").unlink()
    partial = {**json.loads((out / "meta.json").read_text()), "complete": False}
    (out / "meta.json").write_text(json.dumps(partial))
    before = {p: p.stat().st_mtime_ns for p in shards}
    again = prepare([src], TOKENIZER, out, workers=1, shard_mb=0, progress=False)
    after = {p: p.stat().st_mtime_ns for p in shards}
    assert [p.name for p in shards if before[p] != after[p]] == ["shard-00002.bin"]
    assert again["documents"] == meta["documents"] and again["tokens"] == meta["tokens"]
    with pytest.raises(ValueError, match="other inputs, settings or tokenizer"):
        prepare([src], TOKENIZER, out, workers=1, shard_mb=1, progress=False)


RECORDS = [
    b'{"content": "def f():\\n    return 1\\n", "lang": "Python"}',
    b'{"text": "Plain prose about code."}',
    b'{"content": 3, "text": "the first field holding a string is used"}',
    b'',  # blank lines are not documents
    b'{"content": "broken',  # bad_json
    b'{"other": "no text field"}',  # no_text_field
    b'[1, 2, 3]',  # no_text_field
    b'{"text": "\\ud800 a lone surrogate"}',  # invalid_utf8
    b'{"text": "caf\xe9"}',  # invalid_utf8 (latin-1 byte)
    b'{"text": "   "}',  # empty
]


def test_jsonl_and_gzip_sources(tmp_path, tok):
    plain = tmp_path / "d.jsonl"
    plain.write_bytes(b"\n".join(RECORDS) + b"\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wb") as f:
        f.write(plain.read_bytes())
    want_skipped = {"bad_json": 1, "no_text_field": 2, "invalid_utf8": 2, "empty": 1}
    for name in ("d.jsonl", "d.jsonl.gz"):
        meta = prepare([tmp_path / name], TOKENIZER, tmp_path / f"out-{name}", progress=False)
        assert meta["skipped"] == want_skipped, name
        c = Corpus(tmp_path / f"out-{name}")
        assert texts(c, tok) == ["def f():\n    return 1\n", "Plain prose about code.",
                                 "the first field holding a string is used"]
        assert [c.lang(d) for d in range(3)] == ["python", "", ""]
        # where the first skipped records are, as line numbers, and on the console's line
        path = tmp_path / name
        assert meta["skipped_examples"] == {"bad_json": [f"{path}:5"], "empty": [f"{path}:10"],
                                            "invalid_utf8": [f"{path}:8", f"{path}:9"],
                                            "no_text_field": [f"{path}:6", f"{path}:7"]}
        line = summary(meta)
        assert f"bad_json 1 ({path}:5)" in line and f"no_text_field 2 ({path}:6, {path}:7)" in line
        assert line.endswith("documents per language: not given 2, python 1")
    # a big file split into byte ranges reads every line exactly once, in order
    many = tmp_path / "many.jsonl"
    lines = [json.dumps({"text": f"document number {i} " + "x" * (i % 50)}) for i in range(300)]
    many.write_text("\n".join(lines) + "\n")
    one = prepare([many], TOKENIZER, tmp_path / "one", progress=False)
    split = prepare([many], TOKENIZER, tmp_path / "split", shard_mb=0.001, workers=2,
                    progress=False)
    assert len(split["shards"]) > 10 and len(one["shards"]) == 1
    assert texts(Corpus(tmp_path / "split"), tok) == texts(Corpus(tmp_path / "one"), tok) == \
        [json.loads(l)["text"] for l in lines]
    # another field name
    (tmp_path / "body.jsonl").write_text('{"body": "x = 1\\n"}\n')
    meta = prepare([tmp_path / "body.jsonl"], TOKENIZER, tmp_path / "body", text_fields=["body"],
                   progress=False)
    assert meta["documents"] == 1


def test_parquet(tmp_path, tok, monkeypatch):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (requirements-dev.txt) reads .parquet")
    import pyarrow.parquet as pq
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["a = 1\n", None, "b = 2\n"],
                             "lang": ["python", "python", "python"]}), path, row_group_size=2)
    meta = prepare([path], TOKENIZER, tmp_path / "out", progress=False)
    assert meta["skipped"] == {"no_text_field": 1}
    assert texts(Corpus(tmp_path / "out"), tok) == ["a = 1\n", "b = 2\n"]
    # where pyarrow is missing: a clear error rather than a crash
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        prepare([path], TOKENIZER, tmp_path / "out2", progress=False)


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        prepare([tmp_path / "nowhere"], TOKENIZER, tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no files with a known extension"):
        prepare([tmp_path / "empty"], TOKENIZER, tmp_path / "out", progress=False)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="expected a directory of source files"):
        prepare([tmp_path / "data.csv"], TOKENIZER, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="not a folder made by"):
        Corpus(tmp_path / "empty")


def test_stdlib_round_trip(tmp_path, tok):
    """Real files: every kept document decodes to its file's exact text."""
    srcs = [STDLIB / "json", STDLIB / "email"]
    meta = prepare(srcs, TOKENIZER, tmp_path / "out", extensions={".py": "python"},
                   progress=False)
    on_disk = [p.read_bytes().decode() for s in srcs for p in s.rglob("*.py")]
    on_disk = sorted(t for t in on_disk if t.strip())
    assert meta["documents"] == len(on_disk) > 30
    assert sorted(texts(Corpus(tmp_path / "out"), tok)) == on_disk


# ------------------------------------------------------------------------------------------------
# The batch stream


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    prepare([STDLIB / "json"], TOKENIZER, root / "a", progress=False)
    prepare([STDLIB / "email"], TOKENIZER, root / "b", progress=False)
    return [Corpus(root / "a"), Corpus(root / "b")]


def make(corpora, tok, rows=8, row_range=None, transform=None, weights=(0.3, 0.7), seq_len=48):
    return Batches(corpora, list(weights), seq_len, rows, seed=1, tok=tok, transform=transform,
                   row_range=row_range)


def test_global_batch_is_the_same_for_any_number_of_ranks_and_resumes_exactly(corpora, tok):
    whole = make(corpora, tok)
    for world in (2, 4):
        ranks = [make(corpora, tok, row_range=range(r * 8 // world, (r + 1) * 8 // world))
                 for r in range(world)]
        ref = make(corpora, tok)
        for _ in range(30):
            x, y = ref.next()
            parts = [b.next() for b in ranks]
            assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
            assert np.array_equal(np.concatenate([p[1] for p in parts]), y)
    for _ in range(25):
        whole.next()
    state = json.loads(json.dumps(whole.state_dict()))  # what a checkpoint holds: small integers
    assert len(json.dumps(state)) < 1000
    resumed = make(corpora, tok)
    resumed.load_state_dict(state)
    for _ in range(25):
        for a, b in zip(whole.next(), resumed.next()):
            assert np.array_equal(a, b)
    other_seed = Batches(corpora, [0.3, 0.7], 48, 8, seed=2, tok=tok)
    assert not np.array_equal(other_seed.next()[0], make(corpora, tok).next()[0])


def test_packing_puts_each_document_between_bos_and_eos(corpora, tok):
    """One row, one source: the inputs of consecutive steps are the stream itself, which is every
    training document once per epoch, as BOS + tokens + EOS."""
    b = make(corpora[:1], tok, rows=1, weights=[1])
    epoch_tokens = sum(len(corpora[0].tokens(int(d))) + 2 for d in b.train_ids[0])
    steps = epoch_tokens // 48 + 1
    xs, ys = zip(*(b.next() for _ in range(steps)))
    stream = np.concatenate([x[0] for x in xs])
    assert np.array_equal(np.concatenate([x[0, 1:] for x in xs]), np.concatenate(
        [y[0, :-1] for y in ys]))  # targets are the inputs shifted by one
    assert all(np.array_equal(xs[i + 1][0, 0], ys[i][0, -1]) for i in range(steps - 1))
    docs = np.split(stream, np.flatnonzero(stream == tok.bos_id))[1:]  # each starts at a BOS
    whole = [d for d in docs[:-1]]
    assert all(d[-1] == tok.eos_id and (d[1:-1] != tok.bos_id).all() for d in whole)
    want = sorted(tuple(corpora[0].tokens(int(d))) for d in b.train_ids[0])
    assert sorted(tuple(d[1:-1]) for d in whole[:len(want)]) == want  # one epoch: each doc once


def test_mixture_follows_weights_and_reports_epochs(corpora, tok):
    b = make(corpora, tok, rows=16, weights=(0.85, 0.15))
    for _ in range(100):
        b.next()
    share = b.drawn[0] / sum(b.drawn)
    assert abs(share - 0.85) < 0.03
    assert b.epochs() == pytest.approx([n * 48 / c.n_tokens for n, c in zip(b.drawn, corpora)])


def test_transform_sees_exact_text_and_its_mask_becomes_ignored_targets(corpora, tok):
    seen = []

    def every_third_masked(doc, rng):
        seen.append((doc.text, doc.lang))
        ids = np.concatenate([[tok.bos_id], doc.tokens, [tok.eos_id]])
        return ids, np.arange(len(ids)) % 3 != 0

    b = make(corpora[:1], tok, rows=2, weights=[1], transform=every_third_masked)
    x, y = b.next()
    plain = make(corpora[:1], tok, rows=2, weights=[1])
    px, py = plain.next()
    assert np.array_equal(x, px)  # same ids; only targets differ
    masked = y == IGNORE
    assert masked.mean() == pytest.approx(1 / 3, abs=0.05)
    assert np.array_equal(y[~masked], py[~masked])
    on_disk = {p.read_bytes().decode() for p in (STDLIB / "json").rglob("*.py")}
    assert seen and all(text in on_disk and lang == "python" for text, lang in seen)


def test_held_out_sequences_are_fixed_and_masked_like_training(corpora, tok):
    """A tenth of a source's documents (up to 64) are held out: never trained on, always the
    same."""
    train = make(corpora, tok)
    assert len(train.eval_ids[0]) == 0  # json/ has 5 files: too few to spare one
    assert len(train.eval_ids[1]) == corpora[1].n_docs // 10 > 0
    assert set(train.eval_ids[1]).isdisjoint(train.train_ids[1])
    a = make(corpora, tok).held_out(4)
    b = make(corpora, tok).held_out(4)
    assert [s for s, _, _ in a] == [1]
    for (_, xa, ya), (_, xb, yb) in zip(a, b):
        assert xa.shape[1] == 48 and np.array_equal(xa, xb) and np.array_equal(ya, yb)
