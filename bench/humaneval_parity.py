"""Greedy HumanEval pass@1 through our model and through transformers: the two must be equal.

Runs `eval.py humaneval` twice on one checkpoint, with --backend local (model.py + sample.generate)
and --backend hf (transformers' generate), same prompt ids, same stops, greedy, then compares the
completions problem by problem and prints every problem whose completion differs.

    python bench/humaneval_parity.py --ckpt SMOLLM2_DIR                 # all 164 problems
    python bench/humaneval_parity.py --ckpt SMOLLM2_DIR --limit 20      # the first 20
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as evaluate  # noqa: E402  (the repository's eval.py, not the builtin)


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="HF-layout checkpoint folder")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="tokens per completion at most")
    # the same dtype for both backends; bfloat16 runs ~4x faster on this project's CPUs (AMX)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="of both backends")
    p.add_argument("--out", default="out/bench/humaneval-parity",
                   help="folder of both runs' results")
    args = p.parse_args()
    runs = {}
    for backend in ("local", "hf"):
        out = os.path.join(args.out, backend)
        argv = ["humaneval", "--ckpt", args.ckpt, "--backend", backend, "--dtype", args.dtype,
                "--max-new-tokens", str(args.max_new_tokens), "--out", out]
        if args.limit:
            argv += ["--limit", str(args.limit)]
        evaluate.main(argv)
        summary = json.loads(Path(out, "summary.json").read_text())
        samples = {r["task_id"]: r for r in map(json.loads, open(Path(out, "samples.jsonl")))}
        runs[backend] = summary, samples

    (ours, ours_samples), (ref, ref_samples) = runs["local"], runs["hf"]
    differ = [t for t in ours["tasks"] if ours_samples[t]["completions"]
              != ref_samples[t]["completions"]]
    verdict = {t["task_id"]: t["correct"] for t in ours["per_problem"]}
    ref_verdict = {t["task_id"]: t["correct"] for t in ref["per_problem"]}
    print(f"\n# Greedy HumanEval pass@1, {args.ckpt}, {args.dtype}\n")
    print("| backend | problems | pass@1 | passed | generation (s) | s/problem |")
    print("|---|---|---|---|---|---|")
    for name, s in (("local (model.py)", ours), ("hf (transformers)", ref)):
        passed = sum(t["correct"] for t in s["per_problem"])
        print(f"| {name} | {s['n_problems']} | {s['pass@1']:.4f} | {passed} | "
              f"{s['generation_s']:.0f} | {s['generation_s_per_problem']:.2f} |")
    print(f"\npass@1 equal: {ours['pass@1'] == ref['pass@1']}; per-problem verdicts equal: "
          f"{verdict == ref_verdict}; completions differing: {len(differ)} of "
          f"{ours['n_problems']}")
    for t in differ:
        a, b = ours_samples[t]["completions"][0], ref_samples[t]["completions"][0]
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"- {t}: first difference at character {i}: ours {a[i:i + 40]!r}, "
              f"transformers {b[i:i + 40]!r} (verdicts {verdict[t]} / {ref_verdict[t]})")
    return 0 if ours["pass@1"] == ref["pass@1"] else 1


if __name__ == "__main__":
    sys.exit(main())
