"""The Llama architecture that Code Llama trains, written out in one file.

Code Llama changes nothing in the Llama 2 network (Code Llama sec. 2.1): same pre-norm RMSNorm,
RoPE, grouped-query attention and SwiGLU. What changes between stages is data, the vocabulary (four
infilling tokens, sec. 2.3) and the RoPE base (1e4 -> 1e6 for long context, sec. 2.4). So
`rope_theta` is a plain field, the rotation tables are derived from it at run time and never stored,
and `resize_vocab` grows the embeddings for new tokens.

RoPE layout: we rotate in "half-split" form (dim i is paired with dim i + head_dim/2), the layout of
HF checkpoints, so HF folders load and save without touching q/k. Meta's original checkpoints pair
(2i, 2i+1); `_meta_to_hf_qk` permutes their q/k rows at load time, as transformers' Llama
conversion script does (skipping it does not crash: the model just gets quietly worse).
"""

import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: plain multi-head attention (Llama 2 7B/13B)
    vocab_size: int = 32000
    multiple_of: int = 256  # FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    ffn_hidden: int | None = None  # explicit FFN width, as HF configs give it (intermediate_size)
    head_dim_override: int | None = None  # explicit head_dim where a config gives one
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # 1e4 for Llama 2, 1e6 for Code Llama (sec. 2.4)
    # Linear position interpolation (Chen et al. 2023, "Extending context window of large language
    # models via positional interpolation"): positions are divided by this factor, so every
    # frequency is scaled by its inverse. 1: none, as in every released Code Llama; Table 18's
    # ablation of the base change scales the frequencies by 1/4 (factor 4).
    rope_scale: float = 1.0
    max_seq_len: int = 4096  # max_position_embeddings; the RoPE tables grow past it on demand
    tie_embeddings: bool = False  # Llama 2 / Code Llama: untied; small models (SmolLM2): tied
    bos_id: int = 1
    eos_id: int = 2

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim (the parameter count of a 4*dim MLP), scaled, rounded up."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def num_params(self, embeddings: bool = True) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.kv_heads)
        block = attn + 3 * self.dim * self.hidden_dim + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * block + self.dim + (emb if embeddings else 0)


# Dimensions from the released params.json / config.json of Code Llama and Llama 2 (Llama 2 paper,
# Table 1 for the sizes). vocab_size is the tokenizer's.
PRESETS = {
    # a few M parameters: the CPU tests and the demo (GQA on purpose, so tests cover it)
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=32, max_seq_len=1024),
    # ~23M non-embedding parameters: the FIM comparison at a size where infilling can emerge
    "mini": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, multiple_of=32, max_seq_len=1024),
    # ~100M non-embedding parameters, for CPU throughput measurements
    "small": dict(dim=768, n_layers=12, n_heads=12, multiple_of=256, max_seq_len=4096),
    # ~1B, for a one-GPU throughput check
    "1b": dict(dim=2048, n_layers=18, n_heads=16, n_kv_heads=8, multiple_of=256, max_seq_len=4096),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                       ffn_dim_multiplier=1.3),
    "codellama-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32016, rope_theta=1e6,
                         max_seq_len=16384),
    "codellama-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32016, rope_theta=1e6,
                          max_seq_len=16384),
    "codellama-34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, rope_theta=1e6,
                          max_seq_len=16384),
}

# --------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalize in fp32 (bf16 loses the small mean-square terms), then cast back, as Llama does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, length: int, theta: float, device=None, scale: float = 1.0):
    """cos/sin of shape (length, head_dim), built in fp32: position p turns dimension pair i by
    (p / scale) * theta^(-2i/d) (sec. 2.4; `scale` > 1 is linear position interpolation).

    fp32 matters: in bf16 the angle of position 16,000 keeps only ~3 significant digits.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                               / head_dim)
    positions = torch.arange(length, device=device, dtype=torch.float32) / scale
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # half-split layout: dim i pairs with i + d/2
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos/sin: (T, D). Rotates each pair (x_i, x_{i+D/2}) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, layer=0, start_pos=0, mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = gqa_attention(q, k, v, causal=True)
        else:
            k, v = cache.update(layer, start_pos, k, v)  # (B, Hkv, start_pos + T, D)
            y = gqa_attention(q, k, v, causal=T > 1, offset=start_pos, mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*D)


def gqa_attention(q, k, v, causal: bool, offset: int = 0, mask=None):
    """Grouped-query attention: each of the Hkv key/value heads serves H/Hkv query heads (MHA when
    Hkv == H, MQA when Hkv == 1). q: (B, H, T, D); k, v: (B, Hkv, S, D) with S = offset + T.

    SDPA shares kv heads itself (enable_gqa) instead of us copying k/v H/Hkv times, and its fused
    kernels never build the (T, S) score matrix in the causal case, which is what lets 16k-token
    training fit (FSDP shards weights, not activations). Only a cached prefix followed by several
    new tokens (offset > 0) needs an explicit mask: query t sees keys up to offset + t. A `mask`
    given (B, 1, T, S) is used as it is (left-padded prompts decoded together: padding_mask).
    """
    gqa = k.shape[1] != q.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if torch.is_tensor(offset):  # one new token at a tensor position, over a whole static cache
        mask = (torch.arange(k.shape[2], device=q.device) <= offset)[None, :]  # (1, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    T, S = q.shape[2], k.shape[2]
    mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(offset, offset + T,
                                                                     device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, D)


def padding_mask(pad, offset: int, T: int):
    """(B, 1, T, offset + T) attention mask of T new tokens of left-padded rows: query t (at
    offset + t) sees the keys up to itself that are not padding, row b's first pad[b]. A padding
    query sees itself alone: a row of nothing to attend to would give NaN, which the masked
    weights (0 x NaN) would carry into the real rows."""
    keys = torch.arange(offset + T, device=pad.device)
    queries = torch.arange(offset, offset + T, device=pad.device)[:, None]
    mask = (keys <= queries) & ((keys >= pad[:, None, None]) | (keys == queries))
    return mask[:, None]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


def linear_cross_entropy(h, weight, targets, ignore_index=-100, chunk_rows: int | None = None):
    """sum_i cross_entropy(h[i] @ weight.T, targets[i]) over the targets other than ignore_index:
    the value and gradients of F.cross_entropy(F.linear(h, weight).float(), targets,
    ignore_index=ignore_index, reduction="sum") under the same autocast, without ever holding the
    (N, V) logits.

    Over a 49k vocabulary the logits are the largest tensors of a small model's step: the plain
    path writes them in bf16, in fp32, as log-probabilities, then zeroes an fp32 gradient of that
    size and writes two more in backward (~7 GB of memory traffic for 4,096 tokens of SmolLM2, a
    tenth of a CPU step). Here they exist `chunk_rows` rows at a time, and the gradient of each
    chunk, softmax - one-hot (the rows of ignored targets zero), goes at once into h's and the
    weight's gradients (Liger Kernel's fused linear cross-entropy, Hsu et al. 2024): no second
    output matmul in backward. The matmuls run in autocast's dtype as the output layer would, the
    softmax in fp32; the weight's gradient sums the chunks in fp32 (the plain path rounds the
    whole product to bf16 once), so the two agree to bf16 rounding (tests/test_model.py). Under
    no_grad (evaluation) only the loss is computed."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    if chunk_rows is None:  # ~256 MB of fp32 logits per chunk: fewer chunks, fewer weight sums
        chunk_rows = max(1, 2**26 // weight.shape[0])
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if not grad:
        with torch.autocast(dev, enabled=False):
            return _chunked_loss(h.to(dtype), weight.to(dtype), targets, ignore_index, chunk_rows,
                                 None)[0]
    return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, dtype, chunk_rows)


def _chunked_loss(hc, wc, targets, ignore_index, chunk_rows, grads):
    """The loss of linear_cross_entropy in autocast's dtype `hc.dtype`; with `grads` = (dh, dw),
    also their gradients, written into dh (N, D) and summed into dw (V, D, fp32)."""
    loss = torch.zeros((), dtype=torch.float32, device=hc.device)
    for s in range(0, hc.shape[0], chunk_rows):
        h, y = hc[s:s + chunk_rows], targets[s:s + chunk_rows]
        keep = y != ignore_index  # (C,) the targets with a loss
        y = y.masked_fill(~keep, 0)  # an ignored target points at id 0; its row is masked below
        # the output layer's logits, then log-softmax in fp32 as F.cross_entropy(logits.float())
        # computes it, in one pass that reads the bf16 logits (C, V)
        logp = torch.log_softmax(h @ wc.T, dim=-1, dtype=torch.float32)
        picked = logp.gather(1, y[:, None]).squeeze(1)  # (C,)
        loss -= torch.where(keep, picked, 0).sum()
        if grads is None:
            continue
        # softmax - one-hot, rounded to h's dtype as autocast's backward casts the logits'
        # gradient; the target entries, p - 1, computed in fp32 and rounded once. Rows of ignored
        # targets are zeroed in h (for the weight's gradient) and in h's gradient: (C, D), not
        # (C, V); and no data-dependent shapes, so a GPU never waits on the host here.
        g = torch.exp(logp, out=torch.empty(logp.shape, dtype=h.dtype, device=h.device))
        g.scatter_(1, y[:, None], (picked.exp() - 1).to(h.dtype)[:, None])
        mask = keep[:, None].to(h.dtype)
        torch.mm(g, wc, out=grads[0][s:s + chunk_rows]).mul_(mask)  # (C, D)
        grads[1].add_(g.T @ (h * mask))  # (V, D), summed in fp32
    return loss, grads


class _LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy with gradients: they are computed in forward (the loss's gradient is
    one scalar, applied in backward), which is how the logits need never be recomputed."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, dtype, chunk_rows):
        with torch.autocast(h.device.type, enabled=False):
            hc = h.to(dtype)
            grads = (torch.empty_like(hc), torch.zeros(weight.shape, dtype=torch.float32,
                                                       device=weight.device))
            loss, (dh, dw) = _chunked_loss(hc, weight.to(dtype), targets, ignore_index,
                                            chunk_rows, grads)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return (dh.to(ctx.dtypes[0]) * grad_loss, dw.to(ctx.dtypes[1]) * grad_loss,
                None, None, None, None)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, cache=None, start_pos=0, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, self.layer, start_pos,
                               mask)
        return x + self.feed_forward(self.ffn_norm(x))


class KVCache:
    """Keys and values of the tokens seen so far, for incremental decoding.

    Created by the caller (`model.new_cache(...)`), never by the model, so the training forward pass
    carries no state. One (B, Hkv, max_len, D) tensor per layer, the layout SDPA reads without a
    copy, and one a compiled step can update in place.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, args.kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]

    @property
    def max_len(self):
        return self.k[0].shape[2]

    def update(self, layer, start_pos, k, v):
        """Store k, v (B, Hkv, T, D) at start_pos; return the keys and values to attend to."""
        if torch.is_tensor(start_pos):
            # A position held in a tensor (sample.generate's compiled step): the shapes never
            # change from one token to the next, so the whole cache is returned, and
            # gqa_attention masks the positions not written yet.
            self.k[layer].index_copy_(2, start_pos, k)
            self.v[layer].index_copy_(2, start_pos, v)
            return self.k[layer], self.v[layer]
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; position {end} asked for")
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# --------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # ((theta, scale), device, cos, sin): derived from args, not a buffer, never saved
        self._rope = None

    def rope(self, length: int, device):
        """The rotation tables, rebuilt when the base, the scale, the device or the needed length
        changes, so a checkpoint loaded with a new `rope_theta` can never run with the old
        angles."""
        theta, scale = key = (self.args.rope_theta, self.args.rope_scale)
        r = self._rope
        if r is None or r[0] != key or r[1] != device or r[2].shape[0] < length:
            n = max(length, self.args.max_seq_len)
            with torch.inference_mode(False):  # built while sampling, still usable in training
                self._rope = (key, device, *rope_tables(self.args.head_dim, n, theta, device,
                                                        scale))
        return self._rope[2], self._rope[3]

    def forward(self, tokens, cache: KVCache | None = None, start_pos: int = 0,
                last_only: bool = False, targets=None, pad=None):
        """tokens (B, T) -> float32 logits (B, T, V); (B, 1, V) with `last_only` (prefill needs only
        the last position, and (T, V) logits of a 16k prompt would take 2 GB). With `targets`
        (B, T): instead, the summed cross-entropy of the targets other than -100
        (F.cross_entropy's ignore_index), by linear_cross_entropy, without the (B, T, V) logits
        (training; a method of its own would miss FSDP2's hooks, which gather the output weight
        around `forward`). `pad` (B,): the left padding of each row, decoding prompts of
        different lengths together over `cache` (sample.generate): each row's positions count from
        its first real token, and no real token attends to padding (padding_mask)."""
        T = tokens.shape[1]
        mask = None
        if pad is not None:
            if cache is None or torch.is_tensor(start_pos):
                raise ValueError("pad is for eager decoding over a KV cache")
            cos, sin = self.rope(start_pos + T, tokens.device)
            at = (torch.arange(start_pos, start_pos + T, device=tokens.device)[None]
                  - pad[:, None]).clamp(min=0)  # (B, T): padding takes position 0's angles
            cos, sin = cos[at][:, None], sin[at][:, None]  # (B, 1, T, D)
            mask = padding_mask(pad, start_pos, T)
        elif torch.is_tensor(start_pos):  # (1,) position of a one-token step over a static cache
            cos, sin = self.rope(cache.max_len, tokens.device)
            cos, sin = cos.index_select(0, start_pos), sin.index_select(0, start_pos)
        else:
            cos, sin = self.rope(start_pos + T, tokens.device)
            cos, sin = cos[start_pos:start_pos + T], sin[start_pos:start_pos + T]
        h = self.tok_embeddings(tokens)
        for block in self.layers:
            h = block(h, cos, sin, cache, start_pos, mask)
        if last_only:
            h = h[:, -1:]
        if targets is not None:
            return linear_cross_entropy(self.norm(h).flatten(0, 1), self.output.weight,
                                        targets.flatten())
        return self.output(self.norm(h)).float()

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.args, batch_size, max_len, p.dtype, p.device)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Initialization for training from scratch (after `to_empty` when built on meta)."""
        for name, p in self.named_parameters():
            init_weight(name, p, self.args.n_layers, std)

    @torch.no_grad()
    def resize_vocab(self, new_size: int):
        """Grow the embeddings (and output rows) for new tokens, such as the infilling tokens; new
        rows start at the mean row (mean_rows). The training engine grows them the same way while
        loading a checkpoint (load_weights)."""
        old = self.args.vocab_size
        if new_size < old:
            raise ValueError(f"resize_vocab only grows the vocabulary ({old} -> {new_size})")
        if new_size == old:
            return
        emb = self.tok_embeddings.weight
        grown = mean_rows(emb, new_size).clone()
        self.tok_embeddings = nn.Embedding(new_size, self.args.dim, device=emb.device,
                                           dtype=emb.dtype, _weight=grown)
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        else:
            w = self.output.weight
            self.output = nn.Linear(self.args.dim, new_size, bias=False, device=w.device,
                                    dtype=w.dtype)
            self.output.weight.copy_(mean_rows(w, new_size))
        self.args.vocab_size = new_size

    # ----------------------------------------------------------------------------------------------
    # Checkpoints: HF layout in and out, Meta's original layout in

    @classmethod
    def from_pretrained(cls, path, dtype=None, rope_theta=None, device="cpu") -> "Transformer":
        """Load an HF-layout folder (config.json + safetensors) or a Meta folder (params.json +
        consolidated.NN.pth). `dtype` defaults to the checkpoint's; `rope_theta` overrides the base.

        The model is built on the meta device and each parameter is materialized from the file
        tensor by tensor, so peak memory is the weights once plus one tensor, not twice the weights.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {path} does not exist")
        if (path / "config.json").exists():
            args, file_dtype = args_from_hf_config(path / "config.json")
            tensors = hf_tensors(path)
        elif (path / "params.json").exists():
            args, file_dtype = _args_from_meta_params(path / "params.json")
            tensors = _meta_tensors(path, args)
        else:
            raise FileNotFoundError(f"{path} has neither config.json (HF layout) nor params.json "
                                    "(Meta layout)")
        if rope_theta is not None:
            args.rope_theta = float(rope_theta)
        dtype = dtype or file_dtype
        with torch.device("meta"):
            model = cls(args)
        params = dict(model.named_parameters())  # a tied output shares the embedding's entry
        load_weights(params, tensors, path,
                     lambda name, t: _set_param(model, name, t.to(device=device, dtype=dtype)))
        if args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        return model

    def save_pretrained(self, out_dir, shard_bytes: int = 5 * 2**30, dtype=None):
        """Write config.json and safetensors weights (sharded past `shard_bytes`, with an index) in
        the layout transformers' LlamaForCausalLM and vLLM read. Written to a temporary folder
        beside `out_dir` and renamed when complete, so a crash never leaves a half-written
        checkpoint.

        Under FSDP every rank must call this (each parameter is gathered in turn, so no rank ever
        holds more than one shard's worth of full tensors); only rank 0 writes.
        """
        from safetensors.torch import save_file

        from common import umask_mode
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        out_dir = Path(out_dir)
        tmp = None
        if rank == 0:  # mkdir, not mkdtemp (0700): the folder gets the modes the umask gives
            tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
            tmp.mkdir()
        shards, current, size, names = [], {}, 0, _hf_names(self.args)

        def flush():
            nonlocal current, size
            if current and rank == 0:
                fname = f"shard-{len(shards):05d}.safetensors"
                save_file(current, str(tmp / fname), metadata={"format": "pt"})
                os.chmod(tmp / fname, umask_mode(0o666))  # safetensors writes it 0600
                shards.append((fname, list(current)))
            current, size = {}, 0

        seen = set()
        for name, p in self.named_parameters(remove_duplicate=False):
            hf = names[name]
            if hf in seen or (self.args.tie_embeddings and name == "output.weight"):
                continue
            seen.add(hf)
            t = p.full_tensor() if hasattr(p, "full_tensor") else p  # DTensor under FSDP2
            t = t.detach().to("cpu", dtype or t.dtype).contiguous()
            if size and size + t.numel() * t.element_size() > shard_bytes:
                flush()
            current[hf] = t
            size += t.numel() * t.element_size()
        flush()
        if rank != 0:
            return
        if len(shards) == 1:
            os.rename(tmp / shards[0][0], tmp / "model.safetensors")
        else:
            index, total = {}, 0
            for i, (fname, keys) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.rename(tmp / fname, tmp / final)
                index.update({k: final for k in keys})
            for p in self.parameters():
                total += p.numel() * (torch.finfo(dtype).bits // 8 if dtype else p.element_size())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": index}, indent=2))
        sample = next(self.parameters())
        (tmp / "config.json").write_text(json.dumps(_hf_config(self.args, dtype or sample.dtype),
                                                    indent=2))
        if out_dir.exists():  # replace a previous export only once the new one is complete
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)


@torch.no_grad()
def init_weight(name: str, p: torch.Tensor, n_layers: int, std: float = 0.02):
    """One parameter's initialization for training from scratch: norm gains 1, weights normal."""
    if name.endswith("norm.weight"):
        nn.init.ones_(p)
    elif name.endswith(("wo.weight", "w2.weight")):
        # residual-branch outputs scaled with depth: the residual stream keeps its scale
        nn.init.normal_(p, std=std / math.sqrt(2 * n_layers))
    else:
        nn.init.normal_(p, std=std)


def mean_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Embedding rows `t` grown to n rows, the new ones at the mean row: a new token then looks like
    an average token, the output gives it an average logit, and the loss does not jump at the first
    step."""
    return torch.cat([t, t.mean(0, keepdim=True).expand(n - t.shape[0], -1)])


def load_weights(params: dict, tensors, where, put, grow=None):
    """The one loading loop (from_pretrained and the training engine): each checkpoint tensor
    (name, source file, tensor) goes to `put(name, tensor)` for the parameter of that name in
    `params`. `grow`: the checkpoint config's vocab_size, whose embedding rows must be that many;
    rows beyond it (tokens a stage added) start at the mean row, as in Transformer.resize_vocab.
    Shapes must match, and every parameter must be found."""
    loaded = set()
    for name, source, t in tensors:
        if name not in params:
            continue  # e.g. old HF checkpoints' rotary_emb.inv_freq: derived, not a weight
        want = tuple(params[name].shape)
        if grow and name in ("tok_embeddings.weight", "output.weight"):
            if t.shape[0] != grow:
                raise ValueError(f"{Path(where) / source}: tensor {name!r} has {t.shape[0]} rows, "
                                 f"the vocab_size of {Path(where) / 'config.json'} is {grow}")
            t = mean_rows(t.float(), want[0]) if t.shape[0] < want[0] else t
        if tuple(t.shape) != want:
            raise ValueError(f"{Path(where) / source}: tensor {name!r} has shape "
                             f"{tuple(t.shape)}, the model {want}")
        put(name, t)
        loaded.add(name)
    missing = [n for n in params if n not in loaded]
    if missing:
        raise ValueError(f"{where}: tensors missing from the checkpoint: {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def _set_param(model, name, tensor):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, nn.Parameter(tensor, requires_grad=True))


def parallelize(model: Transformer, mesh=None, param_dtype=None, checkpoint_activations=False,
                compile=False) -> Transformer:
    """Ready a model for training, per block, in torchtitan's order: activation checkpointing, then
    compile, then FSDP2 (`fully_shard`) when a device mesh is given. Call it on the meta device,
    before `to_empty`, so the full model never exists on one device (as torchtitan does).

    Parameter names stay as they are (no wrapper or `_orig_mod.` prefixes), so checkpoints and
    `save_pretrained` see the plain model.
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Compute in param_dtype (bf16 on GPU) but reduce gradients in fp32: a sum over many ranks in
    # bf16 loses the small updates (Llama 2 and Code Llama train in bf16).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.layers):
        if checkpoint_activations:
            # keep only each block's input, recompute the rest in backward: FSDP shards weights and
            # optimizer state, not activations, and these are what a 16k context fills (sec. 2.4)
            checkpoint(block)
        if compile:
            block.compile()  # in place: the parameter names keep no `_orig_mod.` prefix
        if mesh is not None:
            # each block's weights are gathered just before it runs and freed after; the last
            # block's stay gathered after forward, since backward needs them right away
            fully_shard(block, mesh=mesh, mp_policy=mp,
                        reshard_after_forward=i < len(model.layers) - 1)
    if mesh is not None:
        fully_shard(model, mesh=mesh, mp_policy=mp)  # the rest: embeddings, final norm, output
    return model


# --------------------------------------------------------------------------------------------------
# HF layout


def _hf_names(args: ModelArgs) -> dict:
    """Our parameter names -> HF LlamaForCausalLM names (transformers' modeling_llama.py)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                 "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                 "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                 "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                 "ffn_norm": "post_attention_layernorm"}
    for i in range(args.n_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def args_from_hf_config(path: Path):
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "intermediate_size"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    for k in required + ["num_key_value_heads", "head_dim", "max_position_embeddings"]:
        v = cfg.get(k, 1)
        if (v is not None or k in required) and (type(v) is not int or v < 1):
            raise ValueError(f"{path}: {k} is {v!r}, not a positive integer")
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    if heads % kv or (not cfg.get("head_dim") and cfg["hidden_size"] % heads):
        raise ValueError(f"{path}: hidden_size {cfg['hidden_size']}, num_attention_heads {heads} "
                         f"and num_key_value_heads {kv} do not divide evenly")
    # Newer transformers write rope_parameters.rope_theta, older ones a top-level rope_theta; Llama
    # 2 configs may carry neither (then 1e4, the Llama 2 base; Code Llama sets 1e6, sec. 2.4).
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 1e4
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "linear"):
        raise ValueError(f"{path}: rope scaling {kind!r} is not part of the Llama 2 / Code Llama "
                         "architecture (only linear position interpolation, Table 18's ablation)")
    scale = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
    if not scale > 0:
        raise ValueError(f"{path}: rope scaling factor {scaling.get('factor')!r} must be positive")
    head_dim = cfg.get("head_dim")
    args = ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
        vocab_size=cfg["vocab_size"], ffn_hidden=cfg["intermediate_size"],
        head_dim_override=head_dim if head_dim and head_dim != cfg["hidden_size"] //
        cfg["num_attention_heads"] else None,
        norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scale=scale,
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        bos_id=cfg.get("bos_token_id", 1), eos_id=_first(cfg.get("eos_token_id", 2)))
    dtype = DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype"), torch.float32)
    return args, dtype


def _first(x):
    return x[0] if isinstance(x, list) else x


def _hf_config(args: ModelArgs, dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
        "num_hidden_layers": args.n_layers, "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len, "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_embeddings, "bos_token_id": args.bos_id,
        "eos_token_id": args.eos_id, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "initializer_range": 0.02,
        # transformers' form of linear position interpolation; None when positions are not scaled
        "rope_scaling": ({"rope_type": "linear", "factor": args.rope_scale}
                         if args.rope_scale != 1.0 else None),
        "torch_dtype": {v: k for k, v in DTYPES.items()}[dtype],
    }


def hf_tensors(path: Path):
    """Yield (our name, source file, tensor) from single or sharded safetensors, one tensor at a
    time."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") \
                from None
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    ours = {v: k for k, v in _hf_names(args_from_hf_config(path / "config.json")[0]).items()}
    for fname in files:
        f = path / fname
        if not f.exists():
            raise FileNotFoundError(f"{f}: listed in the index but missing")
        try:
            handle = safe_open(str(f), framework="pt")
        except Exception as e:  # truncated header, not a safetensors file, ...
            raise ValueError(f"{f}: cannot read safetensors file ({e})") from None
        with handle:
            for key in handle.keys():
                try:
                    t = handle.get_tensor(key)
                except Exception as e:  # data shorter than the header says (truncated file)
                    raise ValueError(f"{f}: cannot read tensor {key!r} ({e})") from None
                yield ours.get(key, key), f.name, t


# --------------------------------------------------------------------------------------------------
# Meta's original layout (how Llama 2 and Code Llama were released)


def _args_from_meta_params(path: Path):
    p = json.loads(path.read_text())
    args = ModelArgs(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                     n_kv_heads=p.get("n_kv_heads"), vocab_size=p.get("vocab_size", -1),
                     multiple_of=p.get("multiple_of", 256),
                     ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
                     norm_eps=p.get("norm_eps", 1e-5),
                     rope_theta=float(p.get("rope_theta", 1e4)))
    if args.vocab_size <= 0:  # Meta's params.json often says -1: the tokenizer decides; read it off
        first = sorted(path.parent.glob("consolidated.*.pth"))[:1]
        if first:
            emb = torch.load(first[0], map_location="cpu", mmap=True, weights_only=True)
            args.vocab_size = emb["tok_embeddings.weight"].shape[0]
    if args.rope_theta > 1e4:
        args.max_seq_len = 16384  # Code Llama's long-context models, as HF's converter sets it
    return args, torch.bfloat16


def _meta_to_hf_qk(w, n_heads):
    """Interleaved pairs (2i, 2i+1) -> half-split pairs (i, i + d/2): reorder the rows of each
    head."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def _meta_tensors(path: Path, args: ModelArgs):
    """Merge model-parallel shards tensor by tensor (Meta's release layout): column-parallel weights
    are concatenated on dim 0, row-parallel ones (and Llama 2's embedding) on dim 1, norms
    replicated."""
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{path}: params.json but no consolidated.NN.pth")
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
    dim1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
    for key in shards[0]:
        if key.endswith("rope.freqs"):
            continue  # derived from rope_theta, never loaded
        parts = [s[key] for s in shards]
        if key.endswith("norm.weight") or len(parts) == 1:
            t = parts[0]
        else:
            t = torch.cat(parts, dim=1 if key.endswith(dim1) else 0)
        if key.endswith("attention.wq.weight"):
            t = _meta_to_hf_qk(t, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = _meta_to_hf_qk(t, args.kv_heads)
        yield key, files[0].name if len(files) == 1 else f"{files[0].name}..", t
