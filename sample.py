r"""Generate from a checkpoint: completion, infilling (Code Llama sec. 2.3), instructions (2.5).

Generation follows gpt-fast: an explicit KV cache, one prefill pass over the prompt, then one token
per step reading only the new token. `generate` is also the engine of backends.py (self-instruct,
HumanEval) and eval.py.

    python sample.py --ckpt out/code/hf --prompt "def fibonacci(n):"
    python sample.py --ckpt out/infill/hf --infill      # the built-in demo: a docstring to fill
    python sample.py --infill             # the same with demo.py's infilling model (runs/demo)
    python sample.py --ckpt out/infill/hf --infill --prefix $'def add(a, b):\n    ' --suffix $'\n'
    python sample.py --ckpt out/infill/hf --infill --spm --prompt $'def f(x):\n    return <FILL>\n'
    python sample.py --ckpt out/instruct/hf --instruct --prompt "Write a function reversing a list"
    python sample.py --ckpt out/instruct/hf --instruct        # interactive multi-turn chat
    python sample.py --ckpt out/code/hf --prompt "def f(" --compile   # compiled decoding steps
    python sample.py --infill --backend openai --base-url http://localhost:8000/v1 \
        --model codellama/CodeLlama-7b-hf --tokenizer CodeLlama-7b-hf/ --greedy   # a vLLM server
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import backends
from common import script_parser
from model import DTYPES, Transformer
from prompts import (RESERVED_TAGS, format_dialog, heal_constraint, infill_decoder, infill_prompt,
                     infill_stop_ids)
from tokenizer import Tokenizer

# Where `python demo.py` leaves its infilling model (SmolLM2 taught to infill): --infill's
# checkpoint when --ckpt is not given.
DEMO_INFILL = Path(__file__).resolve().parent / "runs/demo/infill-smollm2/hf"
# The built-in infilling demo: a docstring to fill between a signature and its body.
DEMO_PREFIX = 'def remove_non_ascii(s: str) -> str:\n    """ '
DEMO_SUFFIX = '\n    return "".join(c for c in s if ord(c) < 128)\n'


@torch.inference_mode()  # no autograd bookkeeping at all: ~8% more tokens/s than no_grad here
def generate(model, prompt, max_new_tokens, temperature=0.0, top_p=1.0, n=1, stop_ids=(),
             stop=None, generator=None, on_token=None, compile=False, allowed=None):
    """Sample `n` continuations of one prompt (a list of ids), batched, with a KV cache; or one
    continuation of each of several prompts (a list of lists of ids, n=1), left-padded to one
    length and decoded together (Transformer.forward's `pad`; eager steps only).

    temperature 0 is greedy. A row ends at any id in `stop_ids` (kept out of its output) or when
    `stop(row, ids)` says so (e.g. a stop string seen in the text). `on_token(ids)` is called after
    every step with row 0's ids so far, for streaming. `compile` runs the one-token steps through
    `compiled_step` (the prefill stays eager). `allowed(row, ids)` returns the ids the row may write
    next, or None for any (token healing: prompts.heal_constraint). Returns a list of n lists of
    generated ids.
    """
    device = model.tok_embeddings.weight.device
    if prompt and isinstance(prompt[0], (list, tuple)):  # several prompts
        if n != 1:
            raise ValueError("several prompts take one continuation each (n=1)")
        width = max(map(len, prompt))
        n, pad = len(prompt), torch.tensor([width - len(p) for p in prompt], device=device)
        tokens = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompt], device=device)
        if not pad.any():
            pad = None
        elif compile:
            raise ValueError("compiled steps decode one prompt (or prompts of one length)")
    else:
        width, pad = len(prompt), None
        tokens = torch.tensor(prompt, device=device).expand(n, -1)
    total = width + max_new_tokens
    if total > model.args.max_seq_len * 64:
        raise ValueError(f"prompt + new tokens = {total} is far past the model's length")
    cache = model.new_cache(n, total)
    logits = model(tokens, cache=cache, start_pos=0, last_only=True, pad=pad)[:, -1]  # prefill
    if compile:
        step = compiled_step(model)
        model.rope(total, device)  # the tables, built before the compiled steps read them
        # one graph for every cache length (Dynamo specializes a batch of 1: one more for n > 1)
        for t in cache.k + cache.v:
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)
    out = [[] for _ in range(n)]
    done = [False] * n
    stop_ids = set(stop_ids)
    for pos in range(width, total):
        for i in range(n) if allowed is not None else ():
            ids = allowed(i, out[i])
            if ids is not None:
                keep = torch.full_like(logits[i], float("-inf"))
                keep[ids] = 0.0
                logits[i] += keep
        nxt = sample_next(logits, temperature, top_p, generator)  # (n,)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t in stop_ids:
                done[i] = True
                continue
            out[i].append(t)
            if stop is not None and stop(i, out[i]):
                done[i] = True
        if on_token is not None:
            on_token(out[0])
        if all(done) or pos == total - 1:
            break
        if compile:  # the position as data: every step is then the same graph
            logits = step(nxt[:, None], cache, torch.tensor([pos], device=device))[:, -1]
        else:
            logits = model(nxt[:, None], cache=cache, start_pos=pos, pad=pad)[:, -1]
    return out


def compiled_step(model):
    """The model's forward compiled for one-token steps over a static cache (gpt-fast's
    --compile): Inductor fuses the ~40 small operations of each layer (norms, RoPE, SwiGLU, cache
    writes) that eager mode runs one by one, and its C++ wrapper calls the kernels without Python
    in between. The first call compiles (minutes for a 30-layer model on a CPU); later calls, at
    any prompt length, reuse it."""
    if getattr(model, "_compiled_step", None) is None:
        model._compiled_step = torch.compile(model.forward, options={"cpp_wrapper": True})
    return model._compiled_step


def sample_next(logits, temperature, top_p, generator=None):
    """logits (n, V) -> next ids (n,): greedy at temperature 0, else nucleus sampling (top-p)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return idx.gather(-1, choice)[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def load(ckpt, dtype=None, device="cpu"):
    """Model and tokenizer from a checkpoint folder, checked against each other."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise SystemExit(f"error: checkpoint folder {ckpt} does not exist")
    try:  # a truncated or corrupt file, a bad config.json, no tokenizer: one line naming it
        model = Transformer.from_pretrained(ckpt, dtype=dtype, device=device).eval()
        tok = Tokenizer.from_pretrained(ckpt)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if tok.vocab_size > model.args.vocab_size:
        raise SystemExit(f"error: {ckpt}: the tokenizer has {tok.vocab_size} tokens but the model "
                         f"only {model.args.vocab_size} embeddings (was the model resized after "
                         "extending the tokenizer?)")
    return model, tok


class Streamer:
    """Prints text as it is generated. Decodes the whole continuation each step and prints what is
    new, so multi-byte characters split over several tokens come out whole."""

    def __init__(self, decode, enabled, color=""):
        self.decode, self.enabled, self.color, self.printed = decode, enabled, color, ""

    def __call__(self, ids):
        if not self.enabled:
            return
        text = self.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return
        new, self.printed = text[len(self.printed):], text
        sys.stdout.write(self.color + new + ("\033[0m" if self.color else ""))
        sys.stdout.flush()


def run_one(args, model, tok, prompt_ids, decode, stop_ids, color="", before="", after="",
            allowed=None):
    """Generate for one prompt; stream or print JSON. Returns the completion text. `allowed`:
    generate's constraint on the next ids (token healing)."""
    gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(args.seed)
    streamer = Streamer(decode, not args.json, color)
    if not args.json:
        sys.stdout.write(before)
    t0 = time.perf_counter()
    first = []

    def on_token(ids):
        if not first:
            first.append(time.perf_counter())  # decode speed excludes the prefill
        streamer(ids)

    ids = generate(model, prompt_ids, args.max_new_tokens, 0.0 if args.greedy else args.temperature,
                   args.top_p, stop_ids=stop_ids, generator=gen, on_token=on_token,
                   compile=args.compile, allowed=allowed)[0]
    t1 = time.perf_counter()
    steps = max(len(ids) - 1, 0)
    tps = steps / (t1 - first[0]) if first and steps else 0.0
    text = decode(ids)
    if args.json:
        print(json.dumps({"completion": text, "token_ids": ids, "tokens_per_s": tps,
                          "prompt_tokens": len(prompt_ids), "time_s": t1 - t0}))
    else:
        sys.stdout.write(after + f"\n\n[{len(ids)} tokens, {tps:.1f} tokens/s]\n")
    return text


def parser():
    p = script_parser(__doc__)
    p.add_argument("--ckpt", help="HF-layout checkpoint folder (weights + tokenizer); with "
                   "--infill, default: the demo's infilling model (runs/demo/infill-smollm2/hf)")
    p.add_argument("--prompt", help="completion prompt; with --infill it may hold <FILL>")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.2,  # Meta's example_completion.py
                   help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: the smallest set "
                   "of tokens holding this much probability")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", action="store_true", help="one JSON object per generation on stdout")
    p.add_argument("--base-url", help="OpenAI-compatible server (--backend openai)")
    p.add_argument("--tokenizer", help="the served model's tokenizer (--backend openai --infill: "
                   "the prompt is built as its token ids)")
    # --compile: minutes once, then ~1.3x tokens/s on a CPU (bench/bench_model.py --compile)
    backends.add_flags(p, ("local", "hf", "openai"),
                       device="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--infill", action="store_true", help="fill in the middle (Code Llama sec. 2.3)")
    p.add_argument("--prefix", help="text before the hole (--infill)")
    p.add_argument("--suffix", help="text after the hole (--infill)")
    p.add_argument("--spm", action="store_true", help="suffix-prefix-middle layout (--infill)")
    p.add_argument("--token-healing", action=argparse.BooleanOptionalAction, default=True,
                   help="--infill --spm on --backend local: back up the prompt's last prefix "
                   "token and let the model rewrite it (Code Llama App. E; eval.py does the same)")
    p.add_argument("--instruct", action="store_true",
                   help="chat (sec. 2.5) in the tokenizer's layout: Llama 2's, ChatML for SmolLM2")
    p.add_argument("--system", help="system prompt (--instruct)")
    return p


def infill_parts(args):
    """--infill's (prefix, suffix): --prefix/--suffix, a --prompt around <FILL>, or the demo's."""
    if (args.prefix is not None or args.suffix is not None) and args.prompt is not None:
        raise SystemExit("error: --infill takes --prefix/--suffix or a --prompt holding "
                         "<FILL>, not both")
    if args.prefix is not None or args.suffix is not None:
        prefix, suffix = args.prefix or "", args.suffix or ""
    elif args.prompt is not None:
        if args.prompt.count("<FILL>") != 1:
            raise SystemExit("error: an --infill prompt needs exactly one <FILL> marker")
        prefix, suffix = args.prompt.split("<FILL>")
    else:
        prefix, suffix = DEMO_PREFIX, DEMO_SUFFIX
    return prefix, suffix


def infill(args, model, tok):
    """--infill: the middle between a prefix and a suffix, in the PSM or SPM layout (sec. 2.3)."""
    prefix, suffix = infill_parts(args)
    try:  # SPM token-healed: its middle continues the prefix's tokens (prompts.infill_prompt)
        prompt_ids, healed = infill_prompt(tok, prefix, suffix, "spm" if args.spm else "psm",
                                           args.token_healing)
    except ValueError as e:
        raise SystemExit(f"error: {args.ckpt}: {e}")
    color = "\033[1;32m" if sys.stdout.isatty() else ""
    run_one(args, model, tok, prompt_ids, infill_decoder(tok, prefix, args.spm, healed),
            infill_stop_ids(tok), color, before=prefix, after=suffix,
            allowed=heal_constraint(tok, healed))


def served(args):
    """--backend hf or openai: --infill, or a completion of --prompt, through backends.py, printed
    whole when it is done (no streaming). Where a server returns only text, token_ids are that
    text encoded by our tokenizer (--tokenizer; [] without one), and tokens_per_s counts the
    prompt's processing too."""
    if args.instruct or not (args.infill or args.prompt is not None):
        raise SystemExit(f"error: --backend {args.backend} runs --infill or a --prompt "
                         "completion (--instruct runs on --backend local)")
    backend = backends.make_backend(args)
    sampling = dict(n=1, temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, seed=args.seed)
    t0 = time.perf_counter()
    try:
        if args.infill:
            prefix, suffix = infill_parts(args)
            c = backend.infill(prefix, suffix, args.spm, **sampling)[0]
        else:
            prefix, suffix = args.prompt, ""
            c = backend.complete(args.prompt, stop=(), **sampling)[0]
    except (backends.ServerError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    wall = time.perf_counter() - t0
    if args.json:
        ids = c.ids
        if ids is None:  # a text-only server: the ids our tokenizer gives its text
            ids = [] if backend.tok is None else (backend.tok.encode_infilling(c.text)
                                                  if args.infill else backend.tok.encode(c.text))
        print(json.dumps({"completion": c.text, "token_ids": ids, "time_s": wall,
                          "tokens_per_s": len(ids) / wall}))
    else:
        print(f"{prefix}{c.text}{suffix}\n\n[{backend.name}: {wall:.1f} s, {c.finish}]")


def instruct(args, model, tok):
    """--instruct: one answer to --prompt, or a multi-turn chat on stdin without it (sec. 2.5)."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = args.prompt is None
    while True:
        if interactive:
            try:
                user = input("\nuser> ")
            except EOFError:
                return
            if not user.strip():
                continue
        else:
            user = args.prompt
        messages.append({"role": "user", "content": user})
        try:
            bad = [t for t in RESERVED_TAGS if t in user]
            if bad:  # refused in either layout, as Code Llama's reference code does
                raise ValueError(f"the user message contains the reserved tags {bad}")
            prompt_ids = format_dialog(tok, messages)
        except ValueError as e:
            messages.pop()
            if not interactive:
                raise SystemExit(f"error: {e}")
            print(f"refused: {e}")
            continue
        decode = lambda ids: tok.decode(ids).strip()  # noqa: E731
        answer = run_one(args, model, tok, prompt_ids, decode, {tok.eos_id},
                         before="" if args.json else "assistant> ")
        messages.append({"role": "assistant", "content": answer})
        if not interactive:
            return


def main(argv=None):
    args = parser().parse_args(argv)
    if args.backend == "openai" or args.base_url:  # a server: backends.make_backend checks
        return served(args)
    if args.ckpt is None and args.infill:
        if not (DEMO_INFILL / "config.json").is_file():
            raise SystemExit(f"error: no --ckpt, and no demo infilling model in {DEMO_INFILL}: "
                             "run `make demo` (or python demo.py) first, or give --ckpt")
        args.ckpt = str(DEMO_INFILL)
    if args.ckpt is None:
        raise SystemExit("error: --ckpt is required (only --infill has a default: the demo's "
                         "infilling model)")
    if args.backend == "hf":
        return served(args)
    model, tok = load(args.ckpt, DTYPES.get(args.dtype), args.device)
    if args.infill:
        return infill(args, model, tok)
    if args.instruct:
        return instruct(args, model, tok)
    if args.prompt is None:
        raise SystemExit("error: give --prompt (or --infill / --instruct)")
    prompt_ids = tok.start_ids + tok.encode(args.prompt)
    # the continuation is decoded after a few prompt tokens (Tokenizer.continuation), so that
    # spaces at the seam come out right without re-decoding a long prompt at every step
    run_one(args, model, tok, prompt_ids, tok.continuation(prompt_ids), {tok.eos_id},
            before=args.prompt)


if __name__ == "__main__":
    main()
