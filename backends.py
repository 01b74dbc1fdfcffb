"""The model backends that write completions for self-instruct and for HumanEval: a checkpoint run
by our own model.py and sample.generate (local), transformers' own model as the reference for it
(hf), or an OpenAI-compatible /completions server such as vLLM or `transformers serve` (openai).

Each has chat(messages, answer_start, ...) for self-instruct, complete(text, ...) for HumanEval and
infill(prefix, suffix, suffix_first, ...) for eval.py infill and sample.py --infill. All return n
Completions, each with its text cut before the first stop string (a chat answer's text begins with
answer_start), finish = "stop" (a stop string or an end token) or "length" (the token limit), and
the generated ids where they are known (None from a server that returns only text).
"""
import http.client
import itertools
import json
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import NamedTuple

from common import item_seed
from prompts import (chat_text, format_dialog, format_infill, infill_decoder, infill_stop_ids,
                     infill_text)
from tokenizer import INFILL_PIECES, Tokenizer


class Completion(NamedTuple):
    text: str
    finish: str
    ids: list = None


def cut_at_stop(text, stop):
    """The text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def finish(text, stop, ended, ids=None):
    """Completion of a decoded generation; `ended`: it stopped before the token limit."""
    text, hit = cut_at_stop(text, stop)
    return Completion(text, "stop" if hit or ended else "length", ids)


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

    def infill(self, prefix, suffix, suffix_first, **sampling):
        """The middle between prefix and suffix (Code Llama sec. 2.3), PSM or SPM: the prompt of
        prompts.format_infill, generation ending at <EOT> or EOS, decoded as Code Llama does."""
        ids = format_infill(self.tok, prefix, suffix, suffix_first)
        return self._generate(ids, stop=(), stop_ids=infill_stop_ids(self.tok),
                              decode=infill_decoder(self.tok, prefix, suffix_first), **sampling)

    def prompt_ids(self, text):
        """A completion prompt (HumanEval): BOS where the tokenizer wants one, then the text."""
        return self.tok.start_ids + self.tok.encode(text)

    def stopper(self, stop):
        """generate's stop callback: a stop string in the text of the row's last tokens. A stop
        string of L characters spans at most L + 1 tokens (each token is at least one byte)."""
        if not stop:
            return None
        window = max(len(s) for s in stop) + 2
        return lambda row, ids: any(s in self.tok.decode(ids[-window:]) for s in stop)

    def _generate(self, prompt_ids, n, temperature, top_p, max_new_tokens, stop, seed,
                  stop_ids=None, decode=None):
        """n Completions of prompt_ids, ending at `stop_ids` (default: the checkpoint's end
        token) or a stop string, their ids decoded by `decode` (default: as a continuation)."""
        from sample import generate
        device = self.model.tok_embeddings.weight.device
        gen = self.torch.Generator(device=device).manual_seed(seed)
        rows = generate(self.model, prompt_ids, max_new_tokens, temperature, top_p, n,
                        stop_ids or self.stop_ids, self.stopper(stop), gen, compile=self.compile)
        decode = decode or self.tok.continuation(prompt_ids)
        return [finish(decode(ids), stop, len(ids) < max_new_tokens, ids) for ids in rows]


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

    def _generate(self, prompt_ids, n, temperature, top_p, max_new_tokens, stop, seed,
                  stop_ids=None, decode=None):
        from transformers import StoppingCriteria, StoppingCriteriaList
        torch = self.torch
        stop_ids = stop_ids or self.stop_ids
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
                eos_token_id=sorted(stop_ids), pad_token_id=self.tok.eos_id,
                stopping_criteria=StoppingCriteriaList([StopStrings()]))
        ids = out[0, len(prompt_ids):].tolist()
        ids = ids[:next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))]
        decode = decode or self.tok.continuation(prompt_ids)
        return [finish(decode(ids), stop, len(ids) < max_new_tokens, ids)]


class ServerError(RuntimeError):
    """A request to an OpenAI-compatible server that failed for good: one line naming the
    server, the request and what came back; `status`, the HTTP status of a refusal (else None)."""
    status = None


# The OpenAI API takes at most four stop strings, and vLLM enforces it (HTTP 400 "List should have
# at most 4 items after validation"): HumanEval has five (eval.py). The first four go to the server,
# and finish() cuts at all of them here, as it does for servers that ignore `stop`.
MAX_STOP = 4


class OpenAIBackend:
    """An OpenAI-compatible /completions endpoint (vLLM, `transformers serve`, llama.cpp's server,
    ...), standard library only.

    n completions: one request asks for n; a server that returns fewer (`transformers serve` and
    llama.cpp's server return one whatever n says) is topped up with further requests, each with a
    seed of its own, and a server seen to ignore n is asked for one at a time from then on.
    Only what can get better is retried, with exponential backoff and jitter: a refused or dropped
    connection, a timeout, a reply cut short, HTTP 408, 429 and 5xx (Retry-After is honoured).
    Anything else (another 4xx, a reply that is JSON but not the one asked for) raises ServerError
    at once. OPENAI_API_KEY, when set, is sent as a bearer token.

    Infilling needs the served model's tokenizer (`tokenizer`, a Tokenizer): see infill."""

    def __init__(self, base_url, model, chat_format="llama2", concurrency=16, retries=6,
                 timeout=600.0, backoff=1.0, tokenizer=None):
        self.base = base_url.rstrip("/")
        self.url = self.base + "/completions"
        self.name, self.chat_format, self.tok = model, chat_format, tokenizer
        self.concurrency, self.retries, self.timeout, self.backoff = (concurrency, retries,
                                                                      timeout, backoff)
        self.ignores_n = False  # learned from the first reply holding one choice for n > 1
        self.takes_ids = None  # infilling: learned by check_infill
        self.tokenization = None  # what check_infill found, for a run's summary
        self.checking = threading.Lock()

    def chat(self, messages, answer_start="", **sampling):
        cs = self.complete(chat_text(messages, self.chat_format, answer_start), **sampling)
        return [c._replace(text=answer_start + c.text) for c in cs]

    def complete(self, text, **sampling):
        return self.request(text, **sampling)

    def infill(self, prefix, suffix, suffix_first, n, temperature, top_p, max_new_tokens, seed):
        """The middle between prefix and suffix from the same pieces as LocalBackend.infill.
        A vLLM server (one answering /tokenize) gets the prompt as our token ids, stops at <EOT>
        by id (`stop_token_ids`) and returns the middle's ids (`return_token_ids`), decoded here as
        LocalBackend decodes them: the same ids in, the same middle out. Any other server gets
        prompts.infill_text and <EOT>'s name as a stop string, and its text is the middle; each
        reply's usage.prompt_tokens must then equal our prompt's length (a check by count only:
        such a server shows no ids)."""
        if self.tok is None:
            raise SystemExit("error: infilling through a server needs the served model's "
                             "tokenizer: --tokenizer (a folder or file with the infilling tokens)")
        ids = format_infill(self.tok, prefix, suffix, suffix_first)
        text = infill_text(prefix, suffix, suffix_first)
        with self.checking:  # the first of the concurrent requests checks, the others wait
            if self.takes_ids is None:
                self.check_infill(ids, text)
        stop_ids = sorted(infill_stop_ids(self.tok))
        sampling = dict(n=n, temperature=temperature, top_p=top_p,
                        max_new_tokens=max_new_tokens, seed=seed)
        if not self.takes_ids:
            return self.request(text, stop=[INFILL_PIECES["eot"]], prompt_tokens=len(ids),
                                **sampling)
        decode = infill_decoder(self.tok, prefix, suffix_first)
        out = []
        for c in self.request(ids, stop=(), extra={"stop_token_ids": stop_ids,
                                                   "return_token_ids": True}, **sampling):
            if c.ids is not None:  # the stop token, where the server keeps it, is no middle
                mid = c.ids[:next((k for k, t in enumerate(c.ids) if t in stop_ids), len(c.ids))]
                c = c._replace(text=decode(mid), ids=mid)
            out.append(c)
        return out

    def check_infill(self, ids, text):
        """Once, before the first infilling request: does the server tokenize the prompt's text to
        our ids? vLLM's /tokenize (beside /v1) says; a server answering it takes token ids too.
        Either way the model gets our ids: a difference is printed, not fatal."""
        root = self.base[:-len("/v1")] if self.base.endswith("/v1") else self.base
        body = {"model": self.name, "prompt": text}
        try:
            reply = self.post(body, root + "/tokenize")
        except ServerError as e:
            if e.status not in (404, 405):
                raise
            self.takes_ids = False
            self.tokenization = "unchecked: no /tokenize; prompt token counts checked per reply"
        else:
            theirs = reply.get("tokens") if isinstance(reply, dict) else None
            if not isinstance(theirs, list):
                raise self.error("a /tokenize reply without tokens", body, reply, root)
            self.takes_ids = True
            k = next((k for k, (a, b) in enumerate(zip(ids, theirs)) if a != b),
                     min(len(ids), len(theirs)))
            self.tokenization = ("equal" if ids == theirs else
                                 f"differs at token {k}: ours {ids[k:k + 4]}, the server's "
                                 f"{theirs[k:k + 4]} ({len(ids)} vs {len(theirs)} tokens)")
        how = "our token ids" if self.takes_ids else "text"
        print(f"{self.base}: the infilling prompt's text tokenized by the server: "
              f"{self.tokenization}; sending {how}", file=sys.stderr, flush=True)
        if not self.takes_ids and self.tok.kind == "sentencepiece":
            # transformers' Llama tokenizers put a space before the suffix (and cut runs of
            # spaces otherwise): prompts of the same length but other ids pass the count check
            print(f"warning: {self.base} takes text and {self.tok.path} is SentencePiece: the "
                  "server's prompt ids may differ from ours (serve with vLLM to send ids)",
                  file=sys.stderr, flush=True)

    def request(self, prompt, n, temperature, top_p, max_new_tokens, stop, seed, extra=None,
                prompt_tokens=None):
        """n Completions of one prompt (text, or a list of token ids), with the server's own
        fields of `extra`; prompt_tokens: the length every reply's usage must show, if it shows
        one."""
        out = []
        for request in itertools.count():
            want = 1 if self.ignores_n else n - len(out)
            # request 0 keeps the item's seed; a top-up request gets one derived from it, so that
            # a rerun asks for the same samples
            s = seed if request == 0 else item_seed(seed, "top-up", request)
            body = {"model": self.name, "prompt": prompt, "n": want,
                    "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                    "seed": s % 2**31, **(extra or {})}
            if stop:
                body["stop"] = list(stop[:MAX_STOP])
            reply = self.post(body)
            try:
                choices = sorted(reply["choices"], key=lambda c: c["index"])
                # servers that honour `stop` leave the string out; cut again for those that don't
                got = [finish(c["text"], stop, c.get("finish_reason") != "length",
                              c.get("token_ids")) for c in choices]
                used = (reply.get("usage") or {}).get("prompt_tokens")
            except (KeyError, TypeError, AttributeError) as e:
                raise self.error(f"a reply without the fields asked for ({type(e).__name__}: "
                                 f"{e})", body, reply) from None
            if prompt_tokens is not None and used is not None and used != prompt_tokens:
                raise self.error(f"the server made {used} tokens of the prompt text, we make "
                                 f"{prompt_tokens}: its tokenizer differs from ours (a server "
                                 "that takes token ids, such as vLLM, gets ours)", body, reply)
            if not 0 < len(got) <= want:
                raise self.error(f"{len(got)} choices for n={want}", body, reply)
            if len(got) == 1 < want and not self.ignores_n:
                self.ignores_n = True
                print(f"{self.url}: one choice for n={want}: this server ignores n, asking for "
                      "one completion per request from now on", file=sys.stderr, flush=True)
            out += got
            if len(out) == n:
                return out

    def error(self, what, body, reply, url=None, status=None):
        """ServerError naming the server, the request (its prompt shortened) and the reply."""
        prompt = body["prompt"]
        if len(prompt) > 60:
            prompt = prompt[:60] + ("..." if isinstance(prompt, str) else ["..."])
        reply = reply if isinstance(reply, str) else json.dumps(reply)
        shown = json.dumps({**body, "prompt": prompt})
        e = ServerError(f"{url or self.url}: {what}; request {shown}; reply {reply[:300]!r}")
        e.status = status
        return e

    def post(self, body, url=None):
        """The parsed JSON reply to one request (to /completions, or `url`), retrying what can
        get better."""
        url = url or self.url
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = "Bearer " + os.environ["OPENAI_API_KEY"]
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2 ** attempt * (0.5 + random.random())
            try:
                req = urllib.request.Request(url, data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
                try:
                    return json.loads(raw)
                except ValueError:  # a page from a proxy, or a body cut short: worth another try
                    why = f"a reply that is not JSON: {raw[:200]!r}"
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code not in (408, 429) and e.code < 500:  # the request's own fault
                    raise self.error(f"HTTP {e.code}", body, detail, url, e.code) from None
                why = f"HTTP {e.code}: {detail}"
                retry_after = e.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    wait = max(wait, float(retry_after))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"  # refused, reset, timeout
            if attempt == self.retries:
                raise self.error(f"gave up after {attempt + 1} tries", body, why, url)
            print(f"{url}: {why}; retrying in {wait:.1f} s", file=sys.stderr, flush=True)
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
    p.add_argument("--device", default=device,
                   help="cpu, cuda, cuda:1, ... (--backend local or hf)")
    p.add_argument("--compile", action="store_true", help="compile the decoding step (local "
                   "backend; minutes once, then faster: sample.py --compile)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (openai)")
    p.add_argument("--retries", type=int, default=6, help="tries after the first (openai)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds (openai)")


def make_backend(args):
    """The backend that --backend names, built from the command line's flags."""
    if getattr(args, "base_url", None) and args.backend != "openai":
        raise SystemExit("error: --base-url goes with --backend openai (and --ckpt without it)")
    if args.backend == "openai":
        if not (args.base_url and args.model):
            raise SystemExit("error: --backend openai needs --base-url and --model")
        # eval.py's HumanEval only completes text: it has no --chat-format, and needs none;
        # infilling needs the served model's tokenizer (OpenAIBackend.infill)
        tok = getattr(args, "tokenizer", None)
        return OpenAIBackend(args.base_url, args.model, getattr(args, "chat_format", "llama2"),
                             args.concurrency, args.retries, args.request_timeout,
                             tokenizer=Tokenizer.from_pretrained(tok) if tok else None)
    if not args.ckpt:
        raise SystemExit(f"error: --backend {args.backend} needs --ckpt")
    from model import DTYPES
    dtype = DTYPES.get(args.dtype)
    if args.backend == "hf":
        if args.compile:
            raise SystemExit("error: --compile is for --backend local (model.py)")
        return HFBackend(args.ckpt, dtype, args.device)
    return LocalBackend(args.ckpt, dtype, args.device, compile=args.compile)
