"""The model backends that write completions for self-instruct and for HumanEval: a checkpoint run
by our own model.py and sample.generate (local), transformers' own model as the reference for it
(hf), or an OpenAI-compatible /completions server such as vLLM (openai).

Each has chat(messages, answer_start, ...) for self-instruct and complete(text, ...) for HumanEval.
Both return n Completions, each with its text cut before the first stop string (a chat answer's
text begins with answer_start) and finish = "stop" (a stop string or the end-of-sequence token) or
"length" (the token limit).
"""
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from typing import NamedTuple

from prompts import chat_text, format_dialog
from tokenizer import Tokenizer


class Completion(NamedTuple):
    text: str
    finish: str


def cut_at_stop(text, stop):
    """The text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def finish(text, stop, ended):
    """Completion of a decoded generation; `ended`: it stopped before the token limit."""
    text, hit = cut_at_stop(text, stop)
    return Completion(text, "stop" if hit or ended else "length")


class LocalBackend:
    """A checkpoint through our own model and sample.generate, one prompt at a time."""
    concurrency = 1

    def __init__(self, ckpt, dtype=None, device="cpu", compile=False):
        import torch
        from sample import load
        self.torch = torch
        self.model, self.tok = load(ckpt, dtype, device)
        self.compile = compile  # sample.generate's compiled decoding steps
        self.name = str(ckpt)
        # the checkpoint's own end token: </s> for Llama 2, <|im_end|> for SmolLM2-Instruct
        self.stop_ids = {self.tok.eos_id}

    def chat(self, messages, answer_start="", **sampling):
        ids = format_dialog(self.tok, messages) + self.tok.encode(answer_start)
        return [c._replace(text=answer_start + c.text) for c in self._generate(ids, **sampling)]

    def complete(self, text, **sampling):
        return self._generate(self.prompt_ids(text), **sampling)

    def prompt_ids(self, text):
        """A completion prompt (HumanEval): BOS where the tokenizer wants one, then the text."""
        bos = [self.tok.bos_id] if self.tok.add_bos and self.tok.bos_id is not None else []
        return bos + self.tok.encode(text)

    def stopper(self, stop):
        """generate's stop callback: a stop string in the text of the row's last tokens. A stop
        string of L characters spans at most L + 1 tokens (each token is at least one byte)."""
        if not stop:
            return None
        window = max(len(s) for s in stop) + 2
        return lambda row, ids: any(s in self.tok.decode(ids[-window:]) for s in stop)

    def _generate(self, prompt_ids, n, temperature, top_p, max_new_tokens, stop, seed):
        from sample import generate
        device = self.model.tok_embeddings.weight.device
        gen = self.torch.Generator(device=device).manual_seed(seed)
        rows = generate(self.model, prompt_ids, max_new_tokens, temperature, top_p, n,
                        self.stop_ids, self.stopper(stop), gen, compile=self.compile)
        return [finish(self.tok.continuation(prompt_ids)(ids), stop, len(ids) < max_new_tokens)
                for ids in rows]


class HFBackend(LocalBackend):
    """transformers' LlamaForCausalLM and its greedy generate, fed the same prompt ids and cut by
    the same stops and decoding as LocalBackend: the reference our greedy pass@1 must equal."""

    def __init__(self, ckpt, dtype=None, device="cpu"):
        import torch
        from transformers import AutoModelForCausalLM
        self.torch = torch
        self.tok = Tokenizer.from_pretrained(ckpt)
        self.model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype or "auto")
        self.model = self.model.to(device).eval()
        self.name = f"transformers:{ckpt}"
        self.stop_ids = {self.tok.eos_id}

    def _generate(self, prompt_ids, n, temperature, top_p, max_new_tokens, stop, seed):
        from transformers import StoppingCriteria, StoppingCriteriaList
        torch = self.torch
        if temperature > 0 or n != 1:
            raise SystemExit("error: --backend hf is the greedy reference: use --temperature 0")
        hit = self.stopper(stop)

        class StopStrings(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = hit is not None and hit(0, input_ids[0, len(prompt_ids):].tolist())
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool,
                                  device=input_ids.device)

        x = torch.tensor([prompt_ids], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, temperature=None,
                top_p=None, top_k=None, max_new_tokens=max_new_tokens,
                eos_token_id=sorted(self.stop_ids), pad_token_id=self.tok.eos_id,
                stopping_criteria=StoppingCriteriaList([StopStrings()]))
        ids = out[0, len(prompt_ids):].tolist()
        ids = ids[:next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))]
        return [finish(self.tok.continuation(prompt_ids)(ids), stop, len(ids) < max_new_tokens)]


class OpenAIBackend:
    """An OpenAI-compatible /completions endpoint (a vLLM server), standard library only.

    429, 5xx, timeouts, dropped connections and unreadable replies are retried with exponential
    backoff and jitter (Retry-After is honoured); other 4xx errors are the request's fault and
    fail at once. OPENAI_API_KEY, when set, is sent as a bearer token."""

    def __init__(self, base_url, model, chat_format="llama2", concurrency=16, retries=6,
                 timeout=600.0, backoff=1.0):
        self.url = base_url.rstrip("/") + "/completions"
        self.name, self.chat_format = model, chat_format
        self.concurrency, self.retries, self.timeout, self.backoff = (concurrency, retries,
                                                                      timeout, backoff)

    def chat(self, messages, answer_start="", **sampling):
        cs = self.complete(chat_text(messages, self.chat_format, answer_start), **sampling)
        return [c._replace(text=answer_start + c.text) for c in cs]

    def complete(self, text, n, temperature, top_p, max_new_tokens, stop, seed):
        body = {"model": self.name, "prompt": text, "n": n, "max_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed % 2**31}
        if stop:
            body["stop"] = list(stop)
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = "Bearer " + os.environ["OPENAI_API_KEY"]
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2 ** attempt * (0.5 + random.random())
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    reply = json.loads(r.read())
                choices = sorted(reply["choices"], key=lambda c: c["index"])
                if len(choices) != n:
                    raise ValueError(f"{len(choices)} choices for n={n}")
                # servers that honour `stop` leave the string out; cut again for those that don't
                return [finish(c["text"], stop, c.get("finish_reason") != "length")
                        for c in choices]
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code != 429 and e.code < 500:
                    raise RuntimeError(f"{self.url}: HTTP {e.code}: {detail}") from None
                why = f"HTTP {e.code}: {detail}"
                retry_after = e.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    wait = max(wait, float(retry_after))
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
                why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # not the reply we need
                why = f"malformed reply: {type(e).__name__}: {e}"
            if attempt == self.retries:
                raise RuntimeError(f"{self.url}: gave up after {attempt + 1} tries: {why}")
            print(f"{self.url}: {why}; retrying in {wait:.1f} s", file=sys.stderr, flush=True)
            time.sleep(wait)


BACKENDS = {"local": "model.py", "hf": "transformers, the greedy reference",
            "openai": "an OpenAI-compatible server"}


def add_flags(p, kinds, device):
    """The flags make_backend reads (besides --ckpt and --base-url): the backend among `kinds`, the
    local checkpoint's dtype, device (default `device`) and compiling, the server's model name and
    request handling."""
    p.add_argument("--backend", choices=kinds, default="local",
                   help="; ".join(f"{k}: {BACKENDS[k]}" for k in kinds))
    p.add_argument("--model", help="model name the server knows (--backend openai)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: the checkpoint's")
    p.add_argument("--device", default=device)
    p.add_argument("--compile", action="store_true", help="compile the decoding step (local "
                   "backend; minutes once, then faster: sample.py --compile)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (openai)")
    p.add_argument("--retries", type=int, default=6, help="tries after the first (openai)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds (openai)")


def make_backend(args):
    """The backend that --backend names, built from the command line's flags."""
    if args.backend == "openai":
        if not (args.base_url and args.model):
            raise SystemExit("error: --backend openai needs --base-url and --model")
        # eval.py's HumanEval only completes text: it has no --chat-format, and needs none
        return OpenAIBackend(args.base_url, args.model, getattr(args, "chat_format", "llama2"),
                             args.concurrency, args.retries, args.request_timeout)
    if not args.ckpt:
        raise SystemExit(f"error: --backend {args.backend} needs --ckpt")
    from model import DTYPES
    dtype = DTYPES.get(args.dtype)
    if args.backend == "hf":
        if args.compile:
            raise SystemExit("error: --compile is for --backend local (model.py)")
        return HFBackend(args.ckpt, dtype, args.device)
    return LocalBackend(args.ckpt, dtype, args.device, compile=args.compile)
