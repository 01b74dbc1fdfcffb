"""Infilling on two CPU cores: SmolLM2-135M continued with FIM, scored on HumanEval-infilling as
Code Llama scores infilling, against the same tasks completed from the prefix alone.

Claim. Code Llama trains its 7B and 13B models with fill-in-the-middle (sec. 2.3), reports their
infilling by greedy pass@1 on HumanEval-infilling (Table 14) and the cost of FIM on ordinary
completion by pass@k and test loss with and without it (Table 5: 0.407 vs 0.408 at 7B). That a
FIM model infills better than a left-to-right model completes from the prefix alone is Bavarian et
al. 2022's comparison. Tested here at 135M parameters and a few million tokens, fixed before it
runs:

- arms: `smollm2`, SmolLM2-135M-Instruct as it is (the four infilling tokens added, their
  embeddings at the mean row, as train_infill.py grows them: step 0 of the FIM run); `fim`,
  train_infill.py --init SmolLM2 --fim-rate 0.9 (half PSM, half SPM, each example whole in one
  context: this project's reading of sec. 2.3); `plain` (--plain), the same with --fim-rate 0,
  stopped nearest the FIM run's target count (whole-example placement pads the FIM run's steps:
  metrics.jsonl's `targets`), its schedule over its own steps. Held equal: init, corpus, data
  order (seed), sequence length, batch, schedule shape, targets;
- corpus: the Python files of the standard library and site-packages (tests, idlelib, ... left
  out), each file cut where a def/class starts (bench/fim_vs_ar.py), one file in 20 held out by a
  hash of its path, a hash-ordered sample of --corpus-mb;
- teacher-forced, on all 1,033 single-line tasks (--forced-tasks), in PSM, SPM and prefix-only
  (eval.infill_forced), for every model and every point of the FIM run's learning curve (--curve
  points, step 0 included): the middle's loss in nats per character and its first token's accuracy;
- generated, greedy, on a seeded subset (--gen-single single-line, --gen-random random-span
  tasks; eval.subset): exact match (eval.infill_exact) and pass@1 by HumanEval's tests in the
  sandbox (eval.humaneval_program, execution.check_programs). The final FIM model in PSM, SPM and
  prefix-only, the others prefix-only (eval.infill_middle; SPM and prefix-only token-healed). Line
  tasks stop after as many line ends as the middle has; a random span has no end that completion
  from the prefix could know, so it is generated in PSM and SPM only;
- the held-out AR loss (bos_eos documents packed in --seq-len windows) of every final model;
- decision rule: the FIM model infills better if its PSM pass@1, and its SPM pass@1, on the
  single-line subset each beat the prefix-only pass@1 of the same tasks (by the plain continuation
  where run, else by SmolLM2) with exact McNemar p < 0.05 (eval.mcnemar). Every pair of `pairs`
  is reported, whatever it shows; no mode is picked on the test tasks.

Each stage keeps its result (corpus, tokens, runs, every model's scores per part under OUT/eval):
the same command continues where it stopped. Greedy decoding runs --gen-batch prompts together
(left-padded: eval.infill_middles), teacher forcing --batch sequences at a time. Models are
evaluated with bf16 weights (under autocast, one-token decoding steps spend more time casting the
weights than multiplying: 2x slower here).

The smallest settings, end to end (minutes; on cores other jobs keep busy, one thread runs SmolLM2
5-10x faster than two, whose OpenMP barriers wait: hence OMP_NUM_THREADS=1 there):

    OMP_NUM_THREADS=1 nice -n 5 python bench/fim_humaneval.py --out /tmp/fh --init SMOLLM2 \\
        --corpus STDLIB/json STDLIB/email --steps 2 --batch-tokens 1024 --seq-len 512 \\
        --micro-batch 2 --curve 2 --plain --forced-tasks 8 --gen-single 4 --gen-random 2 \\
        --eval-windows 2 --max-new-tokens 16

The run for two quiet cores (the issue's 2-hour budget), estimated, not yet run: training 1.5M
tokens, ~55 min at the ~440 tokens/s the issue measured (eager bf16, 512 tokens; less with a faster
step: run a few steps first and size --steps to the rate they log); teacher forcing 795k tokens per
model (3 x 1,033 prompts of ~250 SmolLM2 tokens, padding included) for 4 curve points, ~40 min at
~1,300 tokens/s (a forward pass is a third of a training step); greedy decoding of ~900 prompts,
~15 min. The plain run (--plain) would add its own ~55 min and one more model to score:

    python bench/fim_humaneval.py --out runs/fim-humaneval --init SMOLLM2 \\
        --corpus STDLIB SITE_PACKAGES --corpus-mb 50 --steps 180 --batch-tokens 8192 \\
        --seq-len 512 --micro-batch 4 --lr 3e-4 --warmup 20 --curve 4

(SMOLLM2: `python -c "import sys; sys.path.insert(0, 'scripts'); import gguf_to_hf;
print(gguf_to_hf.cached_conversion())"`; STDLIB: `python -c "import os; print(os.path.dirname(
os.__file__))"`; SITE_PACKAGES: STDLIB/site-packages.) Not run at full size yet.
"""

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import eval as ev  # noqa: E402
from common import pyplot, save_figure, script_parser, write_atomic  # noqa: E402
from data import prepare, summary  # noqa: E402
from execution import check_programs  # noqa: E402
from fim_vs_ar import ar_loss, split_files, steps_to_targets, write_corpus  # noqa: E402
from model import Transformer  # noqa: E402
from sample import load  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

MODES = ev.INFILL_MODES


def train_cmd(args, rate, out, steps):
    """train_infill.py's command line for one run."""
    every = max(1, args.steps // (args.curve - 1))
    return [sys.executable, "train_infill.py", "--init", str(args.init),
            "--data", str(args.out / "data"), "--out", str(out), "--fim-rate", str(rate),
            "--steps", str(steps), "--seq-len", str(args.seq_len),
            "--batch-tokens", str(args.batch_tokens), "--micro-batch", str(args.micro_batch),
            "--lr", str(args.lr), "--warmup", str(args.warmup), "--ckpt-every", str(every),
            "--keep-ckpts", str(args.curve), "--eval-every", "0", "--dtype", "bf16",
            "--seed", str(args.seed)] + ["--compile"] * args.compile


def train(args, name, rate, steps):
    """One run to its end (train.py resumes it from its newest checkpoint); its metrics rows."""
    out = args.out / name
    if not (out / "hf" / "model.safetensors").exists():
        print(f"training {name}: {steps} steps of {args.batch_tokens} tokens (log: "
              f"{args.out / name}.log)", flush=True)
        with open(args.out / f"{name}.log", "a") as log:
            if subprocess.run(train_cmd(args, rate, out, steps), cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT).returncode:
                sys.exit(f"{name} failed: see {args.out / name}.log")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def plain_steps(args, fim_targets):
    """Steps of the plain run whose targets come nearest to the FIM run's, counted on its data
    stream without a model (fim_vs_ar.steps_to_targets); kept in OUT/plain-steps.json."""
    path = args.out / "plain-steps.json"
    if not path.exists():
        argv = train_cmd(args, 0.0, args.out / "plain", args.steps)[2:]
        write_atomic(path, json.dumps(steps_to_targets(argv, fim_targets)))
    return json.loads(path.read_text())


def load_model(args, name, tok):
    """smollm2 (grown as train_infill.py grows it), fim-N (the FIM run's checkpoint at step N),
    or a run's export."""
    if name in ("fim", "plain"):
        return load(args.out / name / "hf")[0]
    model = Transformer.from_pretrained(args.init)
    model.resize_vocab(tok.vocab_size)
    if name.startswith("fim-"):  # the model part of a training checkpoint (torch DCP)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                             set_model_state_dict)
        state = {"model": get_model_state_dict(model)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=args.out / "fim" / "ckpt" / f"step-{int(name[4:]):07d}",
                     no_dist=True)
        set_model_state_dict(model, state["model"])
    return model.eval()


def cached(path, compute):
    """compute()'s JSON result, kept at `path`: a rerun skips what is done."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        write_atomic(path, json.dumps({**compute(), "seconds": time.time() - t0}))
    return json.loads(path.read_text())


def evaluate(args, name, tok, problems, held, generate_modes):
    """Every score of one model, each part kept under OUT/eval/NAME/."""
    folder, model = args.out / "eval" / name, None

    def get_model():
        nonlocal model
        model = model or load_model(args, name, tok).to(torch.bfloat16)
        return model

    single = ev.infill_tasks(problems, "single")
    forced = ev.subset(single, args.forced_tasks, args.seed)
    gen = {"single": ev.subset(single, args.gen_single, args.seed),
           "random": ev.subset(ev.infill_tasks(problems, "random", args.seed), args.gen_random,
                               args.seed)}
    out = {}
    for mode in MODES:
        def score(mode=mode):
            rows = ev.infill_forced(get_model(), tok, forced, mode, batch=args.batch)
            return {"tasks": len(rows),
                    "nats_per_char": sum(r["nats"] for r in rows) / sum(r["chars"] for r in rows),
                    "first_acc": sum(r["first_hit"] for r in rows) / len(rows)}
        out[f"forced/{mode}"] = cached(folder / f"forced-{mode}.json", score)
    for mode in generate_modes:
        for bench, tasks in gen.items():
            if bench == "random" and mode == "l2r":
                continue  # a span's end cannot be known from the prefix alone

            def generate(mode=mode, tasks=tasks):
                lines = [t["middle"].count("\n") if bench == "single" else 0 for t in tasks]
                middles = [r[2] for r in ev.infill_middles(get_model(), tok, tasks, mode,
                                                           args.max_new_tokens, lines=lines,
                                                           batch=args.gen_batch)]
                programs = [ev.humaneval_program(problems[t["problem"]], (
                    t["prefix"] + m + t["suffix"])[len(problems[t["problem"]]["prompt"]):])
                    for t, m in zip(tasks, middles)]
                verdicts = check_programs(programs, progress=False)
                return {"task_ids": [t["task_id"] for t in tasks], "middles": middles,
                        "exact": [int(ev.infill_exact(m, t["middle"]))
                                  for t, m in zip(tasks, middles)],
                        "passed": [int(v.status == "passed") for v in verdicts]}
            out[f"gen/{bench}/{mode}"] = cached(folder / f"gen-{bench}-{mode}.json", generate)
    if name in ("smollm2", "fim", "plain"):
        out["ar_loss"] = cached(folder / "ar-loss.json", lambda: dict(zip(
            ("loss", "tokens"), ar_loss(get_model(), tok, held, args.seq_len,
                                        args.eval_windows))))["loss"]
    return out


def pairs(names):
    """The paired comparisons of pass@1 on the single-line subset, fixed before the run: the FIM
    model's PSM and its SPM, each against the prefix alone by the plain continuation (where run),
    by SmolLM2 as it is, and by the FIM model itself."""
    return [(("fim", fim), (base, "l2r")) for base in ("plain", "smollm2", "fim")
            if base in names for fim in ("psm", "spm")]


def trend(results, curve):
    """What the learning curve implies for PSM: its teacher-forced middle loss fitted as
    a + b ln(targets seen) over the curve's points after step 0 (least squares), and the targets at
    which the fit reaches the final FIM model's prefix-only loss on the same tasks. None where the
    fit does not fall (b >= 0) or has fewer than 2 points."""
    import math
    seen = results["fim"]["targets_by_step"]
    pts = [(math.log(sum(t for s, t in seen.items() if int(s) <= step)),
            results[name]["forced/psm"]["nats_per_char"]) for name, step in curve if step]
    if len(pts) < 2:
        return None
    mx, my = (sum(p[i] for p in pts) / len(pts) for i in (0, 1))
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    a, goal = my - b * mx, results["fim"]["forced/l2r"]["nats_per_char"]
    return {"a": a, "b": b, "goal": goal,
            "targets": math.exp((goal - a) / b) if b < 0 else None}


def report(args, results, curve, names):
    """report.md: the tables, the comparisons, the learning curve (curve.png)."""
    lines = [f"# FIM on HumanEval-infilling: {args.out}", "",
             "Teacher-forced, single-line tasks: middle nats/char and first-token accuracy, "
             "PSM / SPM / prefix only", "", "| model | step | nats/char | first-token acc. |",
             "|---|---|---|---|"]
    for name, step in curve + [(n, None) for n in names if n == "plain"]:
        r = results[name]
        lines.append(f"| {name} | {step if step is not None else '-'} | " + " | ".join(
            " / ".join(f"{r[f'forced/{m}'][k]:.3f}" for m in MODES)
            for k in ("nats_per_char", "first_acc")) + " |")
    lines += ["", "Generated, greedy: exact match / pass@1", "",
              "| model | mode | single-line | random span |", "|---|---|---|---|"]
    for name in names:
        for mode in MODES:
            cells = []
            for bench in ("single", "random"):
                g = results[name].get(f"gen/{bench}/{mode}")
                cells.append(f"{sum(g['exact']) / len(g['exact']):.3f} / "
                             f"{sum(g['passed']) / len(g['passed']):.3f} ({len(g['exact'])})"
                             if g else "-")
            if cells != ["-", "-"]:
                lines.append(f"| {name} | {mode} | {cells[0]} | {cells[1]} |")
    lines += ["", "Paired pass@1, single-line subset (exact McNemar):", ""]
    for (na, ma), (nb, mb) in pairs(names):
        a = results[na][f"gen/single/{ma}"]["passed"]
        b = results[nb][f"gen/single/{mb}"]["passed"]
        only_a, only_b, p = ev.mcnemar(a, b)
        lines.append(f"- {na} {ma} {sum(a) / len(a):.3f} vs {nb} {mb} {sum(b) / len(b):.3f}: "
                     f"passed only by the first {only_a}, only by the second {only_b}, p = {p:.3g}")
    t = trend(results, curve)
    if t:
        lines += ["", f"PSM trend: middle nats/char = {t['a']:.3f} {t['b']:+.4f} ln(targets "
                  f"seen), fitted over the curve's points after step 0; it reaches the final "
                  f"model's prefix-only {t['goal']:.3f} at " + (
                      f"~{t['targets'] / 1e6:,.0f}M targets" if t["targets"] else "no point "
                      "(it does not fall)")]
    lines += ["", "Held-out AR loss: " + ", ".join(
        f"{n} {results[n]['ar_loss']:.4f}" for n in names if "ar_loss" in results[n])]
    for n in ("fim", "plain"):
        if n in results:
            lines.append(f"- {n}: {results[n]['targets']:,} targets in {results[n]['steps']} steps")
    text = "\n".join(lines) + "\n"
    write_atomic(args.out / "report.md", text)
    print(text)
    plt = pyplot()
    if plt:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        steps = [s for _, s in curve]
        for mode in MODES:
            for ax, key in zip(axes, ("nats_per_char", "first_acc")):
                ax.plot(steps, [results[n][f"forced/{mode}"][key] for n, _ in curve], "o-",
                        label=mode)
        for ax, key in zip(axes, ("middle nats/char", "first middle token accuracy")):
            ax.set_xlabel("FIM training step")
            ax.set_ylabel(key)
            ax.legend()
        save_figure(fig, args.out / "curve.png")


def main():
    p = script_parser(__doc__)
    p.add_argument("--out", type=Path, required=True, help="folder of every stage")
    p.add_argument("--init", type=Path, required=True, help="SmolLM2's HF folder")
    p.add_argument("--corpus", type=Path, nargs="+", required=True,
                   help="folders of Python files (the standard library, site-packages)")
    p.add_argument("--corpus-mb", type=float, default=0,
                   help="training text to take, a hash-ordered sample (0: all)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps of the FIM run")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="data order and the task subsets")
    p.add_argument("--compile", action="store_true",
                   help="train with torch.compile (train.py --compile: ~1.2x on 2 cores)")
    p.add_argument("--curve", type=int, default=4,
                   help="points of the FIM run's learning curve, step 0 and the last included")
    p.add_argument("--plain", action="store_true",
                   help="also train the plain continuation, to the FIM run's target count")
    p.add_argument("--forced-tasks", type=int, default=None,
                   help="single-line tasks scored teacher-forced (default: all 1,033)")
    p.add_argument("--gen-single", type=int, default=200, help="single-line tasks generated")
    p.add_argument("--gen-random", type=int, default=60, help="random-span tasks generated")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per generated middle")
    p.add_argument("--batch", type=int, default=4, help="sequences per teacher-forced pass")
    p.add_argument("--gen-batch", type=int, default=8,
                   help="prompts decoded together (left-padded; 1: one at a time)")
    p.add_argument("--eval-windows", type=int, default=128,
                   help="held-out windows of --seq-len tokens for the AR loss")
    args = p.parse_args()
    if args.curve < 2 or args.steps < args.curve - 1:
        p.error("--curve needs at least 2 points (step 0 and the last) and --steps >= curve - 1")
    args.out, args.init = args.out.resolve(), args.init.resolve()
    args.corpus = [c.resolve() for c in args.corpus]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    train_files, held = split_files(args.corpus, args.corpus_mb)
    if not held:
        p.error("no file of --corpus is held out (one in 20, by a hash of its path): add folders")
    if not (args.out / "data" / "meta.json").exists():
        corpus = args.out / "train.jsonl"
        n = write_corpus(train_files, corpus)
        print(f"corpus: {len(train_files)} training files -> {n} documents; {len(held)} files "
              "held out", flush=True)
        meta = prepare([corpus], Tokenizer.from_pretrained(args.init).path, args.out / "data",
                       shard_mb=4)
        print(f"prepared: {summary(meta)}", flush=True)
    rows = train(args, "fim", 0.9, args.steps)
    results = {"fim": {"targets": sum(r["targets"] for r in rows), "steps": rows[-1]["step"],
                       "targets_by_step": {r["step"]: r["targets"] for r in rows}}}
    names = ["fim", "smollm2"]
    if args.plain:
        rows = train(args, "plain", 0.0, plain_steps(args, results["fim"]["targets"]))
        results["plain"] = {"targets": sum(r["targets"] for r in rows), "steps": rows[-1]["step"]}
        names.append("plain")
    print(f"training done after {(time.time() - t0) / 60:.1f} min", flush=True)

    tok = Tokenizer.from_pretrained(args.out / "fim" / "hf")
    problems = ev.read_problems()
    every = max(1, args.steps // (args.curve - 1))
    middle = [s for s in range(every, args.steps, every)][:args.curve - 2]
    curve = [("smollm2", 0)] + [(f"fim-{s}", s) for s in middle] + [("fim", args.steps)]
    for name, _ in curve + [("plain", None)] * args.plain:
        modes = MODES if name == "fim" else ("l2r",) if name in ("smollm2", "plain") else ()
        print(f"evaluating {name}", flush=True)
        results.setdefault(name, {}).update(evaluate(args, name, tok, problems, held, modes))
    results["minutes"] = (time.time() - t0) / 60
    write_atomic(args.out / "results.json", json.dumps(results, indent=1))
    report(args, results, curve, names)
    print(f"{results['minutes']:.1f} min in this session; load average "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
