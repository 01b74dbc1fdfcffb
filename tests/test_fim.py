"""The infilling stage (Code Llama sec. 2.3, issue 4): the FIM transform's statistics and exact
text, training examples that start exactly as the inference prompts, a resumable FIM stream, the
extension of a Llama 2 model to Code Llama's 32,016 ids by train_infill.py, and sample.py
--infill."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, STDLIB
import sample
from data import IGNORE, Batches, Corpus, Document, LoaderWorkers, bos_eos, prepare
from model import ModelArgs, Transformer
from prompts import format_infill, infill_prompt
from tokenizer import Tokenizer
from train_infill import fim, fim_example


@pytest.fixture(scope="module")
def tok(codellama_tokenizer):
    return Tokenizer.from_pretrained(codellama_tokenizer)


def stdlib_chunks(tok, n):
    """n short real documents: the functions and classes of stdlib modules (each cut where the next
    definition starts), 40 to 1,500 characters, each of which decodes back to its text (as
    `prepare` guarantees for a corpus)."""
    out = []
    for f in sorted((STDLIB / "email").rglob("*.py")) + sorted((STDLIB / "json").rglob("*.py")):
        for chunk in re.split(r"\n(?=[ ]*(?:def|class) )", f.read_text()):
            if 40 <= len(chunk) <= 1500 and tok.decode(tok.encode(chunk)) == chunk:
                out.append(Document(np.array(tok.encode(chunk)), "python", tok.decode))
                if len(out) == n:
                    return out
    raise AssertionError(f"only {len(out)} chunks found")


def parse(tok, ids, text):
    """("plain" | "psm" | "spm", prefix, middle, suffix) of a rendered document whose text is
    `text`, decoding each part as its layout encoded it; prefix/middle are None for SPM (encoded
    together). Asserts that the parts give back exactly the document's characters."""
    ids = [int(i) for i in ids]
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    if ids[1] != tok.prefix_id:
        assert tok.decode(ids[1:-1]) == text
        return "plain", None, None, None
    assert ids[-2] == tok.eot_id and ids.count(tok.eot_id) == 1  # <EOT> closes every example
    mid = ids.index(tok.middle_id)
    if ids[2] == tok.suffix_id:  # SPM; or PSM with an empty prefix, identical up to <MID>
        suffix = tok.decode_infilling(ids[3:mid])
        if tok.decode(ids[mid + 1:-2]) + suffix == text:
            return "spm", None, None, suffix
        middle = tok.decode_infilling(ids[mid + 1:-2])
        assert middle + suffix == text
        return "psm", "", middle, suffix
    suf = ids.index(tok.suffix_id)
    prefix, suffix = tok.decode(ids[2:suf]), tok.decode_infilling(ids[suf + 1:mid])
    middle = tok.decode_infilling(ids[mid + 1:-2])
    assert prefix + middle + suffix == text
    return "psm", prefix, middle, suffix


def ks(u):
    """Kolmogorov-Smirnov distance of samples u from the uniform distribution on [0, 1]."""
    u = np.sort(u)
    n = len(u)
    return max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max())


def test_transform_statistics_and_exact_text(tok):
    """Over 3,000 renderings: FIM on ~90% of the documents that fit, PSM:SPM ~1:1, cut points two
    independent uniform draws over the characters, and every example decodes to its document."""
    seq_len = 256
    docs = stdlib_chunks(tok, 600)
    transform, plain = fim(tok, seq_len), bos_eos(tok)
    counts = {"plain": 0, "psm": 0, "spm": 0}
    lo, hi, n_long = [], [], 0
    for d, doc in enumerate(docs):
        for k in range(5):
            ids, mask, whole = transform(doc, np.random.default_rng([7, d, k]))
            if len(doc.tokens) + 2 > seq_len:  # cut across contexts: untouched
                assert np.array_equal(ids, plain(doc, None)[0]) and not whole
                n_long += 1
                continue
            layout, prefix, middle, suffix = parse(tok, ids, doc.text)
            assert whole == (layout != "plain") and len(ids) <= seq_len
            assert layout == "plain" or mask is None  # every id is a target, <EOT> included
            if len(doc.tokens) + 2 + 16 > seq_len:  # the example may not fit: see the next test
                continue
            counts[layout] += 1
            if layout == "plain":
                continue
            n = len(doc.text)
            hi.append((n - len(suffix)) / n)
            if layout == "psm":
                lo.append(len(prefix) / n)
    eligible = sum(counts.values())
    assert n_long > 100 and eligible > 2000  # both kinds are well represented
    assert counts["plain"] / eligible == pytest.approx(0.1, abs=0.02)
    assert counts["spm"] / (counts["psm"] + counts["spm"]) == pytest.approx(0.5, abs=0.04)
    # Sorted pair of two independent uniforms: the smaller has CDF 1-(1-x)^2, the larger x^2.
    lo, hi = np.array(lo), np.array(hi)
    assert ks(1 - (1 - lo) ** 2) < 2 / np.sqrt(len(lo))
    assert ks(hi ** 2) < 2 / np.sqrt(len(hi))
    assert lo.mean() == pytest.approx(1 / 3, abs=0.03)
    assert hi.mean() == pytest.approx(2 / 3, abs=0.03)


@pytest.mark.parametrize("flags, want", [
    ([], {"psm": 0.45, "spm": 0.45, "plain": 0.1}),
    (["--fim-rate", "0"], {"plain": 1.0}),
    (["--fim-rate", "1", "--spm-rate", "0"], {"psm": 1.0}),
    (["--fim-rate", "1", "--spm-rate", "1"], {"spm": 1.0}),
    (["--fim-rate", "1"], {"psm": 0.5, "spm": 0.5}),
])
def test_train_infill_fim_and_spm_rates_reach_the_transform(tok, codellama_tokenizer, tmp_path,
                                                            flags, want):
    """train_infill.py's command line through its stage hook (what train.run calls): the data
    transform it returns renders the share of documents --fim-rate and --spm-rate ask for."""
    import train
    import train_infill
    args = train_infill.parser().parse_args([
        "--init", "tiny", "--tokenizer", str(codellama_tokenizer), "--data", str(tmp_path),
        "--out", str(tmp_path / "out"), "--steps", "1", "--seq-len", "2048", "--lr", "1e-3",
        *flags])
    d = train.Dist(0, 1, torch.device("cpu"), None)
    stage_tok, transform = train_infill.setup(args, tok, d)
    assert stage_tok.path == tok.path  # the tokenizer already has the infilling pieces
    docs = stdlib_chunks(tok, 300)
    counts = {"plain": 0, "psm": 0, "spm": 0}
    for i, doc in enumerate(docs):
        ids, _, _ = transform(doc, np.random.default_rng([3, i]))
        counts[parse(tok, ids, doc.text)[0]] += 1
    for layout, share in want.items():
        # exact where a rate is 0 or 1: a PSM example whose prefix is empty reads as SPM (1 in
        # 300 or so), so the PSM-only arm allows a few
        tol = 0.08 if 0 < share < 1 else 0.03 if layout == "psm" else 0
        assert counts[layout] / len(docs) == pytest.approx(share, abs=tol), (flags, counts)


def test_eligibility_is_the_example_fitting_in_one_context(tok):
    """A document becomes an infilling example only when the example itself, sentinels included,
    fits in one context: the example is 4 to 6 ids longer than the plain rendering (3 sentinels,
    <EOT>, and re-encoding at the cuts), so with 3 ids to spare no draw fits, with 4 most do, and
    the ones that do not are the plain rendering, never a longer example."""
    text = "".join(f"x{i} = {i}\n" for i in range(200))
    ids = tok.encode(text)
    doc = Document(np.array(ids), "python", tok.decode)
    plain = bos_eos(tok)(doc, None)[0]
    for extra, fim_share in ((3, (0, 0)), (4, (0.5, 0.95)), (12, (1, 1))):
        seq_len = len(plain) + extra
        transform, n_fim = fim(tok, seq_len, rate=1.0), 0
        for seed in range(40):
            out, _, whole = transform(doc, np.random.default_rng(seed))
            assert len(out) <= seq_len
            layout = parse(tok, out, text)[0]
            assert whole == (layout != "plain")
            n_fim += layout != "plain"
            if layout == "plain":
                assert np.array_equal(out, plain)
        assert fim_share[0] <= n_fim / 40 <= fim_share[1], (extra, n_fim)
    short = fim(tok, len(plain) - 1, rate=1.0)
    for s in range(20):
        assert np.array_equal(short(doc, np.random.default_rng(s))[0], plain)
    assert all(parse(tok, fim(tok, 4096, rate=0.0)(doc, np.random.default_rng(s))[0], text)[0]
               == "plain" for s in range(20))
    # --no-fim-whole-docs: the same examples, packed like any document
    loose = fim(tok, 4096, rate=1.0, whole_docs=False)(doc, np.random.default_rng(0))
    assert np.array_equal(loose[0], fim(tok, 4096, rate=1.0)(doc, np.random.default_rng(0))[0])
    assert loose[2] is False


def test_training_examples_start_with_the_inference_prompt(tok):
    """PSM: the example is format_infill's prompt for the same cut, then the middle. SPM: the
    example is the prompt with an empty prefix, then prefix + middle encoded as one text; its
    start equals format_infill's SPM prompt whenever the prefix ends on a token boundary, as it
    does at a line end (single-line infilling, Code Llama Table 14)."""
    text = ('def mean(xs: list[float]) -> float:\n    """Arithmetic mean."""\n'
            '    total = sum(xs)\n    return total / len(xs)\n')
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    for a in starts[:-1]:
        for b in starts[starts.index(a) + 1:]:
            prefix, middle, suffix = text[:a], text[a:b], text[b:]
            psm = fim_example(tok, prefix, middle, suffix)
            prompt = format_infill(tok, prefix, suffix)
            assert psm[:len(prompt)] == prompt
            assert psm[len(prompt):] == tok.encode_infilling(middle) + [tok.eot_id, tok.eos_id]
            spm = fim_example(tok, prefix, middle, suffix, suffix_first=True)
            prompt = format_infill(tok, prefix, suffix, suffix_first=True)
            assert spm[:len(prompt)] == prompt
            assert spm[len(prompt) - len(tok.encode(prefix)):-2] == tok.encode(prefix + middle)
    # and the transform's own PSM examples, at random cuts
    transform = fim(tok, 4096, rate=1.0, spm_rate=0.0)
    doc = Document(np.array(tok.encode(text)), "python", tok.decode)
    for s in range(30):
        ids = transform(doc, np.random.default_rng(s))[0].tolist()
        _, prefix, middle, suffix = parse(tok, ids, text)
        prompt = format_infill(tok, prefix, suffix)
        assert ids[:len(prompt)] == prompt


def test_fim_stream_is_deterministic_resumable_and_trains_on_eot(tok, tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i, doc in enumerate(stdlib_chunks(tok, 60)):
        (root / f"m{i:02d}.py").write_text(doc.text)
    prepare([root], tok.path, tmp_path / "data", workers=1, progress=False)
    corpus = Corpus(tmp_path / "data")

    def stream():
        return Batches([corpus], [1.0], 128, 4, seed=3, tok=tok, transform=fim(tok, 128))

    a, b = stream(), stream()
    for _ in range(20):
        for x, y in zip(a.next(), b.next()):
            assert np.array_equal(x, y)
    state = json.loads(json.dumps(a.state_dict()))
    first = [a.next() for _ in range(30)]
    resumed = stream()
    resumed.load_state_dict(state)
    for (xa, ya), (xr, yr) in zip(first, (resumed.next() for _ in range(30))):
        assert np.array_equal(xa, xr) and np.array_equal(ya, yr)
    xs, ys = np.concatenate([x for x, _ in first]), np.concatenate([y for _, y in first])
    assert (ys == tok.eot_id).sum() > 10 and (ys == tok.middle_id).sum() > 10
    # only padding is not a target: what follows an example's EOS, where it did not fit
    assert (xs[ys == IGNORE] == tok.eos_id).all() and 0 < (ys == IGNORE).mean() < 0.2
    # 60 documents, 4 rows: 30 steps of 512 tokens run through several epochs, and a document's
    # cut points are drawn anew in each (the rng is seeded by its position in the stream)
    assert a.epochs()[0] > 2
    d, rng0 = a._doc_at(0, 0)
    later = next(i for i in range(1, 1000) if a._doc_at(0, i)[0] == d)
    doc = Document(corpus.tokens(d), "python", tok.decode)
    draws = {tuple(fim(tok, 4096, rate=1.0)(doc, rng)[0]) for rng in (rng0, a._doc_at(0, later)[1])}
    assert len(draws) == 2


@pytest.fixture(scope="module")
def stdlib_corpus(tok, tmp_path_factory):
    """Real code: the standard library's json, email and asyncio packages, each file cut where a
    top-level or nested def/class starts (as bench/fim_vs_ar.py does), so that at 256 tokens
    most documents fit in one context (and can become infilling examples) and some do not."""
    folder = tmp_path_factory.mktemp("stdlib")
    with open(folder / "pieces.jsonl", "w") as f:
        for path in sorted([*(STDLIB / "json").rglob("*.py"), *(STDLIB / "email").rglob("*.py"),
                            *(STDLIB / "asyncio").rglob("*.py")]):
            for piece in re.split(r"\n(?=[ \t]*(?:async[ \t]+)?(?:def|class)[ \t])",
                                  path.read_text()):
                if piece.strip():
                    f.write(json.dumps({"text": piece + "\n", "lang": "python"}) + "\n")
    prepare([folder / "pieces.jsonl"], tok.path, folder / "data", progress=False)
    return Corpus(folder / "data")


def fim_stream(tok, corpus, transform=None, rows=6, seq_len=256, row_range=None):
    return Batches([corpus], [1.0], seq_len, rows, seed=5, tok=tok,
                   transform=transform or fim(tok, seq_len), row_range=row_range)


def examples_in(tok, x, y):
    """(whole infilling examples, rows where one is cut) of a batch. A row's window is its
    inputs and its last target; an example lies whole in it when its BOS, its sentinels
    <PRE> <SUF> <MID> <EOT> in this order and its closing EOS are all in the window."""
    sentinels = [tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id]
    n_whole = n_cut = 0
    for xr, yr in zip(x, y):
        ids = np.append(xr, yr[-1])
        pos = np.flatnonzero(np.isin(ids, sentinels))
        groups = len(pos) // 4
        ok = (ids[pos].tolist() == sentinels * groups
              and all(p > 0 and ids[p - 1] == tok.bos_id for p in pos[0::4])
              and all(p + 1 < len(ids) and ids[p + 1] == tok.eos_id for p in pos[3::4]))
        n_whole += groups if ok else 0
        n_cut += not ok
    return n_whole, n_cut


def test_infilling_examples_never_cross_a_context_boundary(tok, stdlib_corpus):
    """300 batches of real files at 256 tokens: every infilling example lies whole in one
    context; packed back to back (--no-fim-whole-docs) a third of them would not. The stream is
    the same split over 1, 2 or 4 processes' rows and resumes exactly; padding is counted."""
    rows = 8
    b = fim_stream(tok, stdlib_corpus, rows=rows)
    ranks = {w: [fim_stream(tok, stdlib_corpus, rows=rows,
                            row_range=range(r * rows // w, (r + 1) * rows // w))
                 for r in range(w)] for w in (2, 4)}
    n_whole = pad = 0
    for step in range(300):
        x, y = b.next()
        whole, cut = examples_in(tok, x, y)
        assert cut == 0, f"batch {step}: an infilling example crosses a context boundary"
        n_whole += whole
        pad += b.packing[2]
        assert (b.packing[2] > 0) == (y == IGNORE).any()  # padding is never a target
        for w, parts in ranks.items():
            got = [r.next() for r in parts]
            assert np.array_equal(np.concatenate([g[0] for g in got]), x)
            assert np.array_equal(np.concatenate([g[1] for g in got]), y)
        if step == 149:
            state = json.loads(json.dumps(b.state_dict()))
            later = fim_stream(tok, stdlib_corpus, rows=rows)
            later.load_state_dict(state)
    assert n_whole > 1000  # most of these files fit: 90% of them are examples
    assert 0.02 < pad / (300 * rows * 256) < 0.3  # the cost of keeping them whole
    replay = fim_stream(tok, stdlib_corpus, rows=rows)
    for _ in range(300):
        want = replay.next()
    for _ in range(150):
        got = later.next()
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    loose = fim_stream(tok, stdlib_corpus, fim(tok, 256, whole_docs=False), rows=rows)
    cut = sum(examples_in(tok, *loose.next())[1] for _ in range(100))
    print(f"\n{n_whole} infilling examples in 300 batches, none cut; padding "
          f"{100 * pad / (300 * rows * 256):.1f}% of the tokens; packed back to back, "
          f"{cut} of {100 * rows} rows cut one")
    assert cut > 100 and loose.packing[2] == 0


@pytest.fixture
def no_hang():
    """Fails a test that waits more than a minute instead of letting it hang the suite."""
    def expire(*_):
        raise TimeoutError("the test waited more than 60 s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_loader_workers_build_the_same_batches_and_resume_exactly(tok, stdlib_corpus, no_hang):
    ref = fim_stream(tok, stdlib_corpus)
    want = [(*ref.next(), ref.packing, json.dumps(ref.state_dict())) for _ in range(40)]
    for n in (1, 2, 4):
        b = fim_stream(tok, stdlib_corpus)
        loader = LoaderWorkers(b, n)
        assert len(loader.procs) == n
        for x, y, packing, state in want[:25]:
            gx, gy = loader.next()
            assert np.array_equal(gx, x) and np.array_equal(gy, y) and b.packing == packing
            assert json.dumps(b.state_dict()) == state  # the position of the last batch handed
        loader.close()
        assert not any(p.is_alive() for p in loader.procs)
        resumed = fim_stream(tok, stdlib_corpus)  # a resume from the checkpoint of step 25
        resumed.load_state_dict(json.loads(json.dumps(b.state_dict())))
        loader = LoaderWorkers(resumed, n)
        for x, y, packing, state in want[25:]:
            gx, gy = loader.next()
            assert np.array_equal(gx, x) and np.array_equal(gy, y)
        assert json.dumps(resumed.state_dict()) == want[-1][3]
        loader.close()
    assert len(LoaderWorkers(fim_stream(tok, stdlib_corpus, rows=2), 8).procs) == 2  # <= rows


def test_a_dead_loader_worker_stops_the_loop_with_a_clear_error(tok, stdlib_corpus, no_hang):
    loader = LoaderWorkers(fim_stream(tok, stdlib_corpus), 2)
    loader.next()
    victim = loader.procs[1]
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=rf"worker 1 \(pid {victim.pid}\) died \(killed by "
                                           r"signal 9\) while building batch \d+"):
        for _ in range(10):  # a batch it finished before dying may still be in the pipe
            loader.next()
    assert not any(p.is_alive() for p in loader.procs)  # the other worker is stopped too


def test_a_failing_loader_worker_sends_its_traceback(tok, stdlib_corpus, no_hang):
    transform, calls = fim(tok, 256), [0]

    def breaks_on_the_tenth_document(doc, rng):
        calls[0] += 1  # counted in each worker's own copy
        if calls[0] == 10:
            raise ValueError("a document the transform cannot take")
        return transform(doc, rng)

    loader = LoaderWorkers(fim_stream(tok, stdlib_corpus, breaks_on_the_tenth_document), 2)
    with pytest.raises(RuntimeError, match=r"(?s)worker 0 failed on batch \d+:.*ValueError: a "
                                           "document the transform cannot take"):
        for _ in range(20):
            loader.next()


def test_train_infill_extends_a_llama2_model(llama2_tokenizer, tok, tmp_path):
    """--init a model with Llama 2's 32,000-id tokenizer: the run extends the tokenizer to Code
    Llama's 32,016 ids, grows the embeddings, says so, and exports both; the new tokenizer encodes
    ordinary text exactly as Llama 2's does."""
    init = tmp_path / "llama2-small"
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=32000, multiple_of=32,
                                  max_seq_len=256))
    model.init_weights()
    model.save_pretrained(init)
    Tokenizer.from_pretrained(llama2_tokenizer).save(init)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train_infill.py", "--init", str(init),
                        "--data", str(STDLIB / "json"), "--out", str(out), "--steps", "1",
                        "--seq-len", "64", "--batch-tokens", "256", "--micro-batch", "4",
                        "--lr", "1e-3", "--warmup", "1", "--dtype", "fp32", "--eval-every", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "extended from 32,000 to 32,016 ids" in r.stdout
    assert "embeddings grow from 32,000 to 32,016 rows" in r.stdout
    hf = out / "hf"
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 32016
    trained = Transformer.from_pretrained(hf)
    assert trained.tok_embeddings.weight.shape[0] == trained.output.weight.shape[0] == 32016
    new, old = Tokenizer.from_pretrained(hf), Tokenizer.from_pretrained(llama2_tokenizer)
    assert (new.vocab_size, new.prefix_id, new.suffix_id, new.middle_id, new.eot_id) == \
        (32016, 32007, 32008, 32009, 32010)
    for f in sorted((STDLIB / "json").glob("*.py")):
        text = f.read_text()
        assert new.encode(text) == old.encode(text) and new.decode(new.encode(text)) == text
    assert len(format_infill(new, "a", "b")) == 6
    from test_tokenizer import assert_transformers_loads
    theirs = assert_transformers_loads(hf)
    assert theirs.convert_tokens_to_ids(["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]) == [
        32007, 32008, 32009, 32010]


def test_train_infill_extends_smollm2(smollm2_infill_run):
    """--init SmolLM2 (byte-level BPE, 49,152 ids, tied embeddings): the run (conftest's) adds the
    four tokens as special tokens 49152-49155, grows the embeddings, and exports a folder that
    transformers loads with them and computes the same logits from."""
    transformers = pytest.importorskip("transformers")
    out, r = smollm2_infill_run
    assert "extended from 49,152 to 49,156 ids (added special tokens)" in r.stdout
    assert "embeddings grow from 49,152 to 49,156 rows" in r.stdout
    hf_dir = out / "hf"
    assert json.loads((hf_dir / "config.json").read_text())["vocab_size"] == 49156
    tok = Tokenizer.from_pretrained(hf_dir)
    assert (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id) == (49152, 49153, 49154,
                                                                         49155)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = format_infill(tok, "def f(x):\n    return ", "\n")
    assert hf_tok.convert_tokens_to_ids(["▁<PRE>", "▁<EOT>"]) == [49152, 49155]
    assert hf_tok.decode(ids) == "▁<PRE>def f(x):\n    return ▁<SUF>\n▁<MID>"
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ours = Transformer.from_pretrained(hf_dir)
    with torch.no_grad():
        want = ours(torch.tensor([ids]))
        got = model(torch.tensor([ids])).logits
    assert got.shape[-1] == 49156 and torch.allclose(got, want, atol=1e-3)


@pytest.fixture(scope="module")
def echo_ckpt(tok, tmp_path_factory):
    """A hand-set model whose greedy output is fixed: "X" after any token but "X", and <EOT> after
    "X". Its blocks add nothing (zero output projections), so the last position's logits
    depend on the last token only, through one sign in dimension 0 of its embedding."""
    x, = tok.encode_infilling("X")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size,
                                  multiple_of=32, max_seq_len=256))
    with torch.no_grad():
        model.init_weights()
        for block in model.layers:
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight[:, 0] = 1.0
        model.tok_embeddings.weight[x, 0] = -1.0
        model.norm.weight.zero_()
        model.norm.weight[0] = 1.0
        model.output.weight.zero_()
        model.output.weight[x, 0] = 1.0
        model.output.weight[tok.eot_id, 0] = -1.0
    folder = tmp_path_factory.mktemp("echo")
    model.save_pretrained(folder)
    tok.save(folder)
    return folder


def run_sample(capsys, *argv):
    sample.main([*argv])
    return capsys.readouterr().out


def test_sample_infill_stops_at_eot_and_prints_prefix_middle_suffix(echo_ckpt, tok, capsys):
    ckpt = ["--ckpt", str(echo_ckpt), "--greedy", "--max-new-tokens", "20"]
    x, = tok.encode_infilling("X")
    for spm in ([], ["--spm", "--no-token-healing"], ["--spm"]):
        rows = [json.loads(run_sample(capsys, *ckpt, "--infill", "--json", *spm, *how))
                for how in (["--prefix", "def f():\n    return ", "--suffix", "\n"],
                            ["--prompt", "def f():\n    return <FILL>\n"])]
        assert rows[0]["completion"] == rows[1]["completion"] == "X"  # stopped at <EOT>
        assert rows[0]["token_ids"] == rows[1]["token_ids"]
        if spm != ["--spm"]:
            assert rows[0]["token_ids"] == [x]
            continue
        # token-healed (prompts.infill_prompt): the prompt lacks the prefix's last id, which the
        # model writes again (constrained to its bytes) before the middle; the middle text
        # leaves it out
        prompt, healed = infill_prompt(tok, "def f():\n    return ", "\n", "spm")
        assert healed and rows[0]["prompt_tokens"] == len(prompt)
        ids = rows[0]["token_ids"]
        assert ids[-1] == x and b"".join(map(tok.token_bytes, ids[:-1])) == \
            b"".join(map(tok.token_bytes, healed))
    text = run_sample(capsys, *ckpt, "--infill", "--prefix", "a = ", "--suffix", "\nb = 1\n")
    assert text.startswith("a = X\nb = 1\n\n\n[1 tokens")  # no colour codes off a terminal
    demo = run_sample(capsys, *ckpt, "--infill")
    assert demo.startswith(sample.DEMO_PREFIX + "X" + sample.DEMO_SUFFIX)
    with pytest.raises(SystemExit, match="exactly one <FILL>"):
        sample.main([*ckpt, "--infill", "--prompt", "no marker"])


# ---------------------------------------------------------------------------------------------
# One BOS rule (issue 23, 2a) and the targets each step logs (2b)


@pytest.fixture(scope="module")
def smol(smollm2_dir, tmp_path_factory):
    """SmolLM2's real tokenizer extended with the infilling tokens, as train_infill.py does."""
    from tokenizer import extend_tokenizer
    return Tokenizer.from_pretrained(extend_tokenizer(
        smollm2_dir / "tokenizer.json", tmp_path_factory.mktemp("smol") / "tokenizer.json"))


@pytest.mark.parametrize("which", ["smollm2", "codellama"])
def test_documents_examples_and_prompts_start_alike(which, request):
    """Plain documents, PSM and SPM examples, and the PSM, SPM and prefix-only prompts all start
    with BOS under Llama 2's tokenizer (Code Llama's reference prompts put BOS before <PRE>), and
    none does under SmolLM2's, whose prompts carry no BOS (tokenizer.json, add_bos_token false)."""
    import eval as ev
    t = request.getfixturevalue("smol" if which == "smollm2" else "tok")
    start = [t.bos_id] if which == "codellama" else []
    assert t.start_ids == start
    prefix, middle, suffix = "def f(x):\n", "    y = x + 1\n", "    return y\n"
    text = prefix + middle + suffix
    doc = Document(np.array(t.encode(text)), "python", t.decode)
    assert bos_eos(t)(doc, None)[0].tolist() == start + t.encode(text) + [t.eos_id]
    for mode in ("psm", "spm"):
        example = fim_example(t, prefix, middle, suffix, suffix_first=mode == "spm")
        prompt = format_infill(t, prefix, suffix, suffix_first=mode == "spm")
        assert example[:len(start) + 1] == prompt[:len(start) + 1] == start + [t.prefix_id]
        # the prompt (token-healed in SPM, eval.infill_prompt) and the middle's ids are the
        # example's ids up to its <EOT>
        healed, backed = ev.infill_prompt(t, prefix, suffix, mode)
        assert healed + ev.infill_target(t, {"prefix": prefix, "middle": middle}, mode,
                                         backed) == example[:-2]
    # the prefix-only baseline prompt starts as a plain document does, and continues into it
    prompt, backed = ev.infill_prompt(t, prefix, suffix, "l2r", heal=False)
    assert prompt == start + t.encode(prefix) and backed == []
    healed, backed = ev.infill_prompt(t, prefix, suffix, "l2r")
    assert healed + ev.infill_target(t, {"prefix": prefix, "middle": middle}, "l2r", backed) == \
        start + t.encode(prefix + middle)


def test_smollm2_fim_stream_has_no_bos(smol, tmp_path):
    """In a packed FIM stream over SmolLM2's tokenizer no BOS appears at all: documents are
    separated by EOS alone, and each example starts with <PRE> as its prompt does."""
    with open(tmp_path / "pieces.jsonl", "w") as f:  # json's functions, each a document
        for path in sorted((STDLIB / "json").rglob("*.py")):
            for piece in re.split(r"\n(?=[ \t]*(?:def|class)[ \t])", path.read_text()):
                f.write(json.dumps({"text": piece + "\n", "lang": "python"}) + "\n")
    prepare([tmp_path / "pieces.jsonl"], smol.path, tmp_path / "data", progress=False)
    b = Batches([Corpus(tmp_path / "data")], [1.0], 256, 4, seed=0, tok=smol,
                transform=fim(smol, 256), eval_docs=0)
    rows = np.concatenate([b.next()[0] for _ in range(4)])
    assert not (rows == smol.bos_id).any() and (rows == smol.prefix_id).any()
    for row in rows:
        assert all(p == 0 or row[p - 1] == smol.eos_id
                   for p in np.flatnonzero(row == smol.prefix_id))


def test_metrics_log_each_steps_targets_as_the_stream_counts_them(tokenizer, tmp_path):
    """metrics.jsonl's `targets` is each step's count of trained-on positions, which for FIM with
    whole examples is below the step's tokens by its padding; fim_vs_ar counts the same numbers
    without a model, and gives the plain run the steps that reach the FIM run's total."""
    sys.path.insert(0, str(ROOT / "bench"))
    import fim_vs_ar
    with open(tmp_path / "pieces.jsonl", "w") as f:  # functions: most fit in a context
        for path in sorted([*(STDLIB / "json").rglob("*.py"), *(STDLIB / "email").rglob("*.py")]):
            for piece in re.split(r"\n(?=[ \t]*(?:def|class)[ \t])", path.read_text()):
                f.write(json.dumps({"text": piece + "\n", "lang": "python"}) + "\n")
    argv = ["--init", "tiny", "--tokenizer", str(tokenizer), "--data",
            str(tmp_path / "pieces.jsonl"),
            "--steps", "3", "--seq-len", "256", "--batch-tokens", "1024", "--micro-batch", "4",
            "--lr", "1e-3", "--warmup", "1", "--eval-every", "0", "--dtype", "fp32"]
    logged = {}
    for rate in ("0.9", "0"):
        out = tmp_path / f"fim-{rate}"
        r = subprocess.run([sys.executable, "train_infill.py", *argv, "--fim-rate", rate,
                            "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        logged[rate] = [row["targets"] for row in rows]
        counted = fim_vs_ar.stream_targets([*argv, "--fim-rate", rate, "--out",
                                            str(tmp_path / f"count-{rate}")], steps=3)
        assert logged[rate] == counted
        pad = [round(row["pad_frac"] * 1024) for row in rows]
        assert all(t <= 1024 - p for t, p in zip(logged[rate], pad))  # padding is no target
    assert sum(logged["0.9"]) < 3 * 1024 and logged["0"] == [1024] * 3
    fim_targets = sum(logged["0.9"])
    plain_argv = [*argv, "--fim-rate", "0", "--out", str(tmp_path / "p")]
    plain = fim_vs_ar.stream_targets(plain_argv, until=fim_targets)
    assert sum(plain[:-1]) < fim_targets <= sum(plain)
    k = fim_vs_ar.steps_to_targets(plain_argv, fim_targets)  # the nearest count of steps
    assert abs(sum(plain[:k]) - fim_targets) == min(abs(sum(plain[:j]) - fim_targets)
                                                    for j in range(len(plain) + 1))


def test_infilling_comparisons_are_fixed_before_the_run():
    """Both benches pair the FIM model's PSM and its SPM with prefix-only completion by each
    baseline: the same pairs whatever the scores (no mode picked on the test tasks)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import fim_humaneval
    import fim_vs_ar
    fim = [("fim-0.9", "psm"), ("fim-0.9", "spm")]
    assert fim_vs_ar.comparisons(["fim-0.9", "fim-0"]) == [(m, ("fim-0", "l2r")) for m in fim]
    assert fim_vs_ar.comparisons(["fim-0.9", "fim-0", "untrained"]) == [
        (m, (base, "l2r")) for base in ("fim-0", "untrained") for m in fim]
    assert fim_humaneval.pairs(["fim", "smollm2"]) == [
        (("fim", m), (base, "l2r")) for base in ("smollm2", "fim") for m in ("psm", "spm")]
    assert [b for _, b in fim_humaneval.pairs(["fim", "smollm2", "plain"])][:2] == [
        ("plain", "l2r")] * 2


def test_the_psm_trend_is_a_log_fit_over_targets_seen():
    """fim_humaneval.trend: points on 1.2 - 0.05 ln(T) (T the targets seen by each curve step,
    step 0 left out) give back a and b, and the targets where the line meets the final model's
    prefix-only loss; a curve that does not fall gives no such point."""
    import math
    sys.path.insert(0, str(ROOT / "bench"))
    import fim_humaneval
    results = {"fim": {"targets_by_step": {str(s): 1000 for s in range(1, 31)},
                       "forced/l2r": {"nats_per_char": 0.5}},
               "smollm2": {"forced/psm": {"nats_per_char": 9.0}}}  # step 0: not fitted
    curve = [("smollm2", 0)]
    for step in (10, 20, 30):
        results[f"fim-{step}"] = {"forced/psm": {"nats_per_char": 1.2 - 0.05 * math.log(
            1000 * step)}}
        curve.append((f"fim-{step}", step))
    t = fim_humaneval.trend(results, curve)
    assert t["a"] == pytest.approx(1.2) and t["b"] == pytest.approx(-0.05)
    assert t["targets"] == pytest.approx(math.exp(0.7 / 0.05), rel=1e-6)
    for name, _ in curve[1:]:
        results[name]["forced/psm"]["nats_per_char"] = 0.9
    assert fim_humaneval.trend(results, curve)["targets"] is None
