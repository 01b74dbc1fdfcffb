"""GPU speed side by side, in one process and one run: training against torchtitan, a full Llama 2
7B shape on one GPU, and greedy decoding against transformers and the memory-bandwidth ceiling.

1. Training. Our engine (model.py's Transformer, parallelized as train.py does it) against
   torchtitan's Llama (its model and its own activation checkpointing, compile and FSDP2 functions,
   called in its parallelize_llama's order, and its loss), on the same synthetic batches: the 1b
   preset, and the Llama 2 7B shape cut to --cut-layers layers. Sequences of 4,096 tokens, bf16
   compute from fp32 master weights with fp32 gradient reduction (FSDP2's MixedPrecisionPolicy),
   each block compiled, the same activation-checkpointing choice and tokens per step on both sides.
   If torchtitan does not import or build, transformers' LlamaForCausalLM takes its place under
   the same FSDP2 + compile set-up, and the table says why.
2. The full Llama 2 7B shape (6.7B parameters) on one GPU, activation checkpointing, the largest
   micro-batch that fits (tried from --max-micro-batch down, halving).
3. Decoding the 7B shape in bf16 (random weights: speed does not depend on them), greedy, 256 new
   tokens after a 512-token prompt: sample.generate eager and compiled against transformers'
   generate with its dynamic cache, and with a static cache compiled. Each figure also as a share
   of the bandwidth ceiling: the bytes a token must read (every weight but the embedding table,
   plus the keys and values so far) times tokens/s, over the device's memory bandwidth.

How it is timed. Training: every model is built on the meta device, prepared, materialized and
initialized on the GPU; the optimizer (the engine's fused AdamW, for all sides) gets its state
from one zero-gradient step; then --warmup-steps steps (the first compiles), a synchronize, and
--steps steps timed together up to a final synchronize. Our step is the engine's own
(train.train_step: micro-batches summed into the loss over the step's targets, backward, clipping
to 1.0, AdamW); a reference's step does the same work with its own loss (torchtitan's, compiled
as its trainer compiles it). MFU is train.flops_per_token (6N + 12·L·H·Q·T, PaLM App. B) over
train.PEAK_FLOPS's bf16 peak, the same FLOPs for both sides (the same shape). Peak memory is
torch.cuda.max_memory_allocated over the whole configuration (weights, optimizer state,
activations). Decoding: the clock is read as each
new token reaches the CPU (generate's on_token; transformers' streamer), and tokens/s runs from the
first new token to the last, as sample.py reports it (the prefill left out); the median of
--rounds generations, after one more (which compiles, when compiled: timed and reported).

One process and one GPU: FSDP2 runs on a one-rank mesh. (train_code.py started as one process
builds no mesh and uses bf16 autocast instead; FSDP2 on one rank is the code path of a multi-GPU
run, the one worth comparing.)

On this project's CPU, every part at toy sizes (54 s of CPU time; 2 min 36 s of wall time at a load
average of 10, 3 min 48 s with Inductor's caches cold), with torchtitan from the private
environment described below, or without it (then transformers is the reference):

    OMP_NUM_THREADS=2 python bench/bench_gpu.py --toy --out runs/bench-gpu-toy

On one H200, at most 9 minutes: no measurement starts after --budget-s (420 s), and each finished
one is written to --out at once, so a run cut short still leaves its rows; rows the budget skipped
are marked, and another session runs them with --parts. torchtitan 0.2.2 and the packages its
import needs that the GPU machine lacks (it has triton, tensorboard, einops, pyarrow, pandas) travel
as wheels in bench/wheels/ (ignored by git; all pure Python, 1.7 MB), fetched here with

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d bench/wheels \
        torchtitan==0.2.2 torchdata==0.11.0 tyro==1.0.17 docstring_parser==0.18.0 \
        typeguard==4.6.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

then, with the device tool: carry ["bench/wheels"], timeout_s 540, and the command

    python3 -m pip install -q --no-index --no-deps --target /tmp/site bench/wheels/*.whl \
        && export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 \
        python3 bench/bench_gpu.py --out $OUT/bench-gpu

torchtitan 0.2.2 imports and runs with torch 2.13 on this CPU (the toy run); whether it does with
the GPU machine's torch is what the run finds out (if not, transformers stands in, and the table
says why). Here it lives in a private environment, leaving the shared installation alone:

    python -m venv --system-site-packages /work/venv-i19
    /work/venv-i19/bin/pip install tyro einops tensorboard datasets triton
    /work/venv-i19/bin/pip install --no-deps torchtitan==0.2.2 torchdata==0.11.0
"""

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from common import script_parser, write_atomic  # noqa: E402
from data import IGNORE  # noqa: E402
from model import ModelArgs, Transformer, parallelize  # noqa: E402
from sample import generate  # noqa: E402

# Memory bandwidth per device in bytes/s, from the vendors' datasheets (HBM; longer names first,
# as in train.PEAK_FLOPS). Other devices, CPUs included, are measured (read_bandwidth).
BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
             "A100 80GB PCIe": 1.935e12, "A100": 1.555e12}
VOCAB = 32000  # Llama 2's tokenizer, which the 1b preset is trained with
TORCHTITAN_VERSION = "0.2.2"  # the API below (parallelize_llama's functions) is this version's


# --------------------------------------------------------------------------------------------------
# The figures


def mfu(tokens_per_s: float, fpt: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: the FLOP/s the tokens imply over the device's peak."""
    return tokens_per_s * fpt / peak if peak else None


def decode_bytes_per_token(margs: ModelArgs, context: float, bytes_per_value: int = 2) -> float:
    """Bytes one decoding step must read: every parameter but the input embedding table (a lookup
    reads one row of it), and the keys and values of the `context` tokens before it."""
    weights = margs.num_params(embeddings=False) + margs.vocab_size * margs.dim
    kv = 2 * margs.n_layers * margs.kv_heads * margs.head_dim * context
    return (weights + kv) * bytes_per_value


def read_bandwidth(device, mbytes: int = 512) -> float:
    """Bytes/s of summing a buffer several times the caches: what streaming weights can reach."""
    x = torch.ones(mbytes * 2**20 // 4, device=device)
    x.sum()
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    sync(device)
    return 5 * x.numel() * 4 / (time.perf_counter() - t)


def datasheet_bandwidth(name: str) -> float | None:
    """BANDWIDTH's figure for a device name as torch.cuda.get_device_name gives it."""
    return next((v for k, v in BANDWIDTH.items() if k in name), None)


def bandwidth(device) -> tuple[float, str]:
    """(bytes/s, where the figure comes from): the datasheet's, else measured."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bw = datasheet_bandwidth(name)
    if bw:
        return bw, f"{name}, datasheet"
    return read_bandwidth(device), f"{name}, measured (a 512 MB read)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device):
    """Drop compiled code and cached blocks between configurations: each one starts clean."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------------------
# The three trainers: each returns (model, loss_fn); loss_fn(model, x, y) -> the summed token loss
# of a reference, None for ours (the engine's own step, train.train_step, computes it)


def one_rank_mesh(device):
    """A process group and a device mesh of this process alone: FSDP2 with nobody to talk to."""
    from torch.distributed.device_mesh import init_device_mesh
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                store=dist.HashStore())
    return init_device_mesh(device.type, (1,))


def build_ours(margs: ModelArgs, mesh, device, ac: bool, compile: bool, param_dtype):
    """train.build_model's order: meta device, parallelize (checkpointing, compile, FSDP2), then
    materialize. Weights from Transformer.init_weights on the device (build_model draws them on the
    CPU one tensor at a time, the same for any number of ranks: slow for 7B, and speed does not
    depend on them)."""
    with torch.device("meta"):
        model = Transformer(margs)
    parallelize(model, mesh, param_dtype, ac, compile)
    model.to_empty(device=device)
    model.init_weights()
    return model, None


def build_torchtitan(margs: ModelArgs, mesh, device, ac: bool, compile: bool, param_dtype):
    """torchtitan's Llama with its own parallelize_llama steps on a one-rank mesh (its
    parallelize_llama applies FSDP only when the data-parallel degree is above 1, so its three
    functions are called here, in its order), and its loss, compiled when the model is, as its
    trainer does."""
    from torchtitan.config import JobConfig
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.models.llama3 import Transformer as TitanTransformer, TransformerModelArgs
    from torchtitan.models.llama3.infra import parallelize as tp

    targs = TransformerModelArgs(dim=margs.dim, n_layers=margs.n_layers, n_heads=margs.n_heads,
                                 n_kv_heads=margs.n_kv_heads, vocab_size=margs.vocab_size,
                                 multiple_of=margs.multiple_of, rope_theta=margs.rope_theta,
                                 max_seq_len=margs.max_seq_len, norm_eps=margs.norm_eps)
    job = JobConfig()
    job.activation_checkpoint.mode = "full" if ac else "none"
    job.compile.enable = compile
    with torch.device("meta"):
        model = TitanTransformer(targs)
    if ac:
        tp.apply_ac(model, job.activation_checkpoint, model_compile_enabled=compile)
    if compile:
        tp.apply_compile(model, job.compile)
    tp.apply_fsdp(model, mesh, param_dtype=param_dtype or torch.float32,
                  reduce_dtype=torch.float32, pp_enabled=False)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    titan_loss = build_cross_entropy_loss(job)
    return model, lambda m, x, y: titan_loss(m(x), y)


def llama_config(margs: ModelArgs):
    """transformers' LlamaConfig of the same shape."""
    import transformers
    return transformers.LlamaConfig(
        hidden_size=margs.dim, intermediate_size=margs.hidden_dim, num_hidden_layers=margs.n_layers,
        num_attention_heads=margs.n_heads, num_key_value_heads=margs.kv_heads,
        vocab_size=margs.vocab_size, max_position_embeddings=margs.max_seq_len,
        rms_norm_eps=margs.norm_eps, rope_theta=margs.rope_theta, attn_implementation="sdpa")


def build_transformers(margs: ModelArgs, mesh, device, ac: bool, compile: bool, param_dtype):
    """transformers' LlamaForCausalLM under our set-up: per decoder layer checkpointing, compile
    and fully_shard, then the root. Built on the device (its rotary table is computed at
    construction, which the meta device would leave empty)."""
    import transformers
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cfg = llama_config(margs)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if ac:  # torchtitan's wrapper: the composable checkpoint() under a compiled decoder layer
            # fails in backward with torch 2.13 (a stride mismatch in the compiled graph)
            layer = layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
        if compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)

    def loss_fn(m, x, y):
        return F.cross_entropy(m(input_ids=x).logits.flatten(0, 1).float(), y.flatten(),
                               reduction="sum")
    return model, loss_fn


def reference_trainer():
    """(name, builder, why): torchtitan when it imports, else transformers and the reason."""
    try:
        import torchtitan
        from torchtitan.models.llama3.infra import parallelize  # noqa: F401
        if torchtitan.__version__ != TORCHTITAN_VERSION:
            raise ImportError(f"torchtitan {torchtitan.__version__} is installed; this script "
                              f"drives {TORCHTITAN_VERSION}'s functions")
        return f"torchtitan {torchtitan.__version__}", build_torchtitan, ""
    except Exception as e:  # missing, or an API this torch lacks: say which
        why = f"torchtitan unusable here ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        return "transformers LlamaForCausalLM", build_transformers, why


# --------------------------------------------------------------------------------------------------
# One training configuration


class SyntheticBatches:
    """What train.train_step reads of a data.Batches: next() -> (inputs, targets) as numpy arrays,
    the packing counts and this rank's rows. Random tokens, the same for every trainer and every
    step: speed does not depend on the text."""

    def __init__(self, vocab: int, rows: int, seq_len: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, vocab, (rows, seq_len + 1), generator=g).numpy()
        self.x, self.y = t[:, :-1], t[:, 1:]
        self.row_range = range(rows)
        self.packing = (rows, 0, 0)  # sequences of one document, of several; padding tokens

    def next(self):
        return self.x, self.y


def reference_step(model, loss_fn, opt, batches, micro_batch: int, device) -> float:
    """train.train_step's work, read off it, with a reference's own loss: the batch to the device,
    the target count read back, micro-batches summed into the loss over that count, clipping to
    1.0 (the norm read back), AdamW."""
    x, y = (torch.from_numpy(t).to(device) for t in batches.next())
    n_targets = max(1, (y != IGNORE).sum().item())
    loss_sum = torch.zeros((), device=device)
    for i in range(0, len(x), micro_batch):
        loss = loss_fn(model, x[i:i + micro_batch], y[i:i + micro_batch])
        (loss / n_targets).backward()
        loss_sum += loss.detach()
    loss = loss_sum.item() / n_targets
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    grad_norm.item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def stepper(model, loss_fn, opt, batches, micro_batch: int, d):
    """step(k) -> loss: the engine's train_step for ours (no autocast: FSDP2 casts the parameters
    itself), reference_step for a reference."""
    if loss_fn is not None:
        return lambda k: reference_step(model, loss_fn, opt, batches, micro_batch, d.device)
    args = SimpleNamespace(micro_batch=micro_batch, grad_clip=1.0, lr=3e-4, warmup=1,
                           final_lr_frac=1 / 30, steps=1000, out="")
    no_autocast = torch.autocast(d.device.type, enabled=False)
    return lambda k: train.train_step(k, model, opt, batches, args, d, no_autocast)[1]


def optimizer(model):
    """The engine's fused AdamW (Code Llama sec. 2.6 settings), its state made now by one step of
    zero gradients, so that the memory it takes is there before any micro-batch is tried."""
    opt = train.make_optimizer(model, SimpleNamespace(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-5,
                                                      weight_decay=0.1))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def measure_training(build, margs, seq_len, rows, micro_batch, ac, a, d) -> dict:
    """Build, warm up, time: tokens/s, MFU, peak memory, and the first step's seconds (compile)."""
    free_memory(d.device)
    model, loss_fn = build(margs, d.mesh, d.device, ac, a.compile, a.param_dtype)
    opt = optimizer(model)
    step = stepper(model, loss_fn, opt, SyntheticBatches(margs.vocab_size, rows, seq_len),
                   micro_batch, d)
    t = time.perf_counter()
    losses = [step(1)]
    first_s = time.perf_counter() - t
    for k in range(2, a.warmup_steps + 1):
        step(k)
    sync(d.device)
    t = time.perf_counter()
    losses += [step(k) for k in range(a.warmup_steps + 1, a.warmup_steps + a.steps + 1)]
    sync(d.device)
    tps = a.steps * rows * seq_len / (time.perf_counter() - t)
    fpt = train.flops_per_token(margs, seq_len)
    row = {"tokens_per_s": tps, "mfu": mfu(tps, fpt, a.peak), "peak_mem_gb": peak_memory_gb(
        d.device), "first_step_s": first_s, "loss_first": losses[0], "loss_last": losses[-1],
        "params": sum(p.numel() for p in model.parameters())}
    del model, opt, loss_fn, step
    free_memory(d.device)
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"losses not finite: {losses}")
    return row


# --------------------------------------------------------------------------------------------------
# The parts


def shapes(toy: bool, cut_layers: int) -> dict:
    """The model shapes and lengths of the parts; --toy: the same kinds at CPU size (the 1b
    preset's grouped-query attention, the 7B shape's plain multi-head attention)."""
    if toy:
        small = dict(dim=64, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=128)
        return {"1b": ModelArgs(n_layers=2, n_kv_heads=2, **small),
                "7B cut": ModelArgs(n_layers=cut_layers, **small),
                "7B": ModelArgs(n_layers=4, **small), "seq_len": 64, "prompt": 32, "new": 16}
    return {"1b": ModelArgs.from_name("1b", vocab_size=VOCAB),
            "7B cut": ModelArgs.from_name("llama2-7b", vocab_size=VOCAB, n_layers=cut_layers),
            "7B": ModelArgs.from_name("llama2-7b", vocab_size=VOCAB),
            "seq_len": 4096, "prompt": 512, "new": 256}


def part1(a, d, sh, report):
    ref_name, ref_build, why = reference_trainer()
    rows = a.batch_tokens // sh["seq_len"]
    # the 1b preset as the README's H200 row ran it (no checkpointing); the 7B shape as
    # train_code.py's 7B command runs it (--activation-checkpointing)
    cut = f"the 7B shape, {sh['7B cut'].n_layers} of {sh['7B'].n_layers} layers"
    for name, label, ac in [("1b", "the 1b preset", False), ("7B cut", cut, True)]:
        what = (f"train {label}, {rows} x {sh['seq_len']} tokens per step, micro-batch "
                f"{a.micro_batch}, checkpointing {'on' if ac else 'off'}")
        ours = report.run(1, what + ": ours", lambda: measure_training(
            build_ours, sh[name], sh["seq_len"], rows, a.micro_batch, ac, a, d))
        ref = report.run(1, what + f": {ref_name}", lambda: measure_training(
            ref_build, sh[name], sh["seq_len"], rows, a.micro_batch, ac, a, d), note=why)
        if "error" in ref and ref_build is build_torchtitan:  # imports, but fails to run here
            why = f"torchtitan failed here ({ref['error']})"
            ref_name, ref_build = "transformers LlamaForCausalLM", build_transformers
            ref = report.run(1, what + f": {ref_name}", lambda: measure_training(
                ref_build, sh[name], sh["seq_len"], rows, a.micro_batch, ac, a, d), note=why)
        report.ratio(1, what, ours, ref, ref_name, "tokens_per_s", target="target >= 1.0x, "
                     "goal 1.1x")


def fits(margs, seq_len, micro_batch, a, d) -> bool:
    """Whether one step of `micro_batch` sequences runs without running out of memory, tried with
    the compiled blocks run eagerly (Inductor's fused kernels keep fewer intermediates than eager
    code, so what fits eagerly fits compiled), on a model with its optimizer state."""
    free_memory(d.device)
    try:
        model, _ = build_ours(margs, d.mesh, d.device, True, a.compile, a.param_dtype)
        opt = optimizer(model)
        step = stepper(model, None, opt, SyntheticBatches(margs.vocab_size, micro_batch, seq_len),
                       micro_batch, d)
        with torch.compiler.set_stance("force_eager"):
            step(1)
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    model = opt = step = None  # noqa: F841 (released before the next try)
    free_memory(d.device)
    return ok


def part2(a, d, sh, report):
    margs, seq_len = sh["7B"], sh["seq_len"]
    what = f"train the full 7B shape ({margs.num_params():,} parameters), checkpointing"
    mb = a.max_micro_batch
    while mb >= 1:
        tried = report.run(2, f"{what}: micro-batch {mb} fits?",
                           lambda: {"fits": fits(margs, seq_len, mb, a, d)})
        if "skipped" in tried or tried.get("fits"):
            break
        mb //= 2
    if "skipped" in tried:
        return
    if mb < 1:
        need = 16 * margs.num_params() / 2**30
        report.note(2, what, f"does not fit: fp32 weights, gradients and AdamW's two moments "
                    f"take {need:.0f} GiB before any activation; two ranks halve that (FSDP2), "
                    "or optimizer offload (FSDP2's CPUOffloadPolicy) moves it to the host; "
                    f"part 1's {a.cut_layers} layers of it fit")
        return
    rows = a.accumulation * mb
    report.run(2, f"{what}, {rows} x {seq_len} tokens per step, micro-batch {mb} (the largest "
               f"of {a.max_micro_batch}, halving, that fits)", lambda: measure_training(
                   build_ours, margs, seq_len, rows, mb, True, a, d))


def decode_model_ours(margs, device, dtype):
    """Random weights in `dtype`, cast on the meta device first: no fp32 copy is ever made."""
    with torch.device("meta"):
        model = Transformer(margs).to(dtype)
    model.to_empty(device=device)
    model.init_weights()
    return model.eval()


def decode_model_transformers(margs, device, dtype):
    """Built in fp32 on the device (27 GB for 7B, a moment on a GPU), then cast."""
    import transformers
    with torch.device(device):
        return transformers.LlamaForCausalLM(llama_config(margs)).to(dtype).eval()


def decode_rate(token_times, rounds: int, compiled: bool) -> dict:
    """token_times(): the clock at each new token of one generation. Tokens/s from the first new
    token (the prefill's) to the last, as sample.py reports it: the prefill is left out. The
    median of `rounds`, after a warm-up call (which compiles, when compiled: timed, reported)."""
    t = time.perf_counter()
    token_times()
    row = {"compile_s": time.perf_counter() - t} if compiled else {}
    rates = [(len(ts) - 1) / (ts[-1] - ts[0]) for ts in (token_times() for _ in range(rounds))]
    return {**row, "tokens_per_s": statistics.median(rates)}


def part3(a, d, sh, report):
    import transformers
    from transformers.generation.streamers import BaseStreamer
    margs, device, dtype = sh["7B"], d.device, torch.bfloat16
    free_memory(device)
    prompt = torch.randint(0, margs.vocab_size, (sh["prompt"],),
                           generator=torch.Generator().manual_seed(0)).tolist()
    new = sh["new"]
    bw, bw_source = bandwidth(device)
    per_token = decode_bytes_per_token(margs, sh["prompt"] + new / 2)  # the mean context
    ceiling = bw / per_token
    report.note(3, "decode ceiling", f"{per_token / 1e6:,.1f} MB read per token (bf16 weights and "
                f"the mean {sh['prompt'] + new // 2}-token KV cache) at {bw / 1e9:,.0f} GB/s "
                f"({bw_source}): {ceiling:,.1f} tokens/s")
    ours = decode_model_ours(margs, device, dtype)
    theirs = decode_model_transformers(margs, device, dtype)
    ids = torch.tensor([prompt], device=device)

    def ours_times(compiled):
        def token_times():
            times = []
            out = generate(ours, prompt, new, temperature=0.0, compile=compiled,
                           on_token=lambda _: times.append(time.perf_counter()))[0]
            assert len(out) == new == len(times)
            return times
        return token_times

    class Clock(BaseStreamer):
        """generate's streamer: put() gets the prompt, then each new token (moved to the CPU, so
        the token is computed when the clock is read)."""
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:
                self.times.append(time.perf_counter())

        def end(self):
            pass

    def theirs_times(static):
        kw = {}
        if static:
            # the static cache compiles generate's one-token forward (by default on GPUs only, in
            # "reduce-overhead" mode: CUDA graphs; on a CPU, plain Inductor, like ours)
            config = transformers.CompileConfig(**({} if device.type == "cuda" else
                                                   {"mode": None}))
            config._compile_all_devices = True
            kw = dict(cache_implementation="static", compile_config=config)

        def token_times():
            clock = Clock()
            with torch.inference_mode():
                out = theirs.generate(ids, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, attention_mask=torch.ones_like(ids),
                                      pad_token_id=0, streamer=clock, **kw)
            assert out.shape[1] == len(prompt) + new == len(prompt) + len(clock.times)
            return clock.times
        return token_times

    what = f"decode the 7B shape, bf16, greedy, {new} tokens after {sh['prompt']}"
    results = {}

    def measure(token_times, compiled):
        r = decode_rate(token_times, a.rounds, compiled)
        return {**r, "of_ceiling": r["tokens_per_s"] / ceiling}

    for key, label, fn, compiled in [
            ("ours", "sample.generate", ours_times(False), False),
            ("hf", "transformers generate, dynamic cache", theirs_times(False), False),
            ("ours_c", "sample.generate compiled", ours_times(True), True),
            ("hf_c", "transformers generate, static cache + compile", theirs_times(True), True)]:
        results[key] = report.run(3, f"{what}: {label}", lambda: measure(fn, compiled))
    report.ratio(3, f"{what}, eager", results["ours"], results["hf"], "transformers dynamic",
                 "tokens_per_s")
    report.ratio(3, f"{what}, compiled", results["ours_c"], results["hf_c"],
                 "transformers static + compile", "tokens_per_s",
                 target="target >= 1.1x, and >= 80% of the ceiling")


# --------------------------------------------------------------------------------------------------
# The report: every finished measurement is written out at once


class Report:
    def __init__(self, out: Path, budget_s: float, header: dict):
        self.out, self.budget_s, self.t0 = out, budget_s, time.perf_counter()
        self.header, self.rows = header, []
        out.mkdir(parents=True, exist_ok=True)

    def run(self, part: int, what: str, fn, note: str = "") -> dict | None:
        """Run one measurement unless the time budget is spent; record it, or why it is missing."""
        if time.perf_counter() - self.t0 > self.budget_s:
            return self.add({"part": part, "what": what, "skipped": "time budget spent"})
        print(f"[{time.perf_counter() - self.t0:6.0f} s] part {part}: {what}", flush=True)
        try:
            result = fn()
        except (Exception, SystemExit) as e:  # one failure must not cost the others (one GPU run)
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"}
            free_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.add({"part": part, "what": what, **result, **({"note": note} if note else {})})
        return result

    def ratio(self, part, what, ours, ref, ref_name, key, target=""):
        if ours and ref and key in ours and key in ref:
            self.add({"part": part, "what": what, "ratio": ours[key] / ref[key],
                      "note": f"ours / {ref_name}" + (f"; {target}" if target else "")})

    def note(self, part, what, text):
        self.add({"part": part, "what": what, "note": text})

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        print("  " + json.dumps(row), flush=True)
        self.write()
        return row

    def write(self):
        """results.json and results.md, each written whole and renamed into place."""
        data = {**self.header, "elapsed_s": time.perf_counter() - self.t0, "rows": self.rows}
        write_atomic(self.out / "results.json", json.dumps(data, indent=1))
        write_atomic(self.out / "results.md", self.markdown())

    def markdown(self) -> str:
        def cell(r, k, fmt, scale=1):
            return fmt.format(scale * r[k]) if r.get(k) is not None else ""
        lines = ["| part | what | tokens/s | MFU | peak GB | share of ceiling | first step / "
                 "compile s | ratio | note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            note = r.get("note") or r.get("error") or r.get("skipped") or ""
            if "fits" in r:
                note = "fits" if r["fits"] else "out of memory"
            lines.append(" | ".join([
                f"| {r['part']}", r["what"], cell(r, "tokens_per_s", "{:,.1f}"),
                cell(r, "mfu", "{:.3g}%", 100), cell(r, "peak_mem_gb", "{:.1f}"),
                cell(r, "of_ceiling", "{:.1%}"),
                cell(r, "first_step_s", "{:.0f}") or cell(r, "compile_s", "{:.0f}"),
                cell(r, "ratio", "{:.2f}x"), note]) + " |")
        return "\n".join(lines) + "\n"


def main():
    p = script_parser(__doc__)
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                   help="1: training vs torchtitan, 2: the full 7B step, 3: decoding")
    p.add_argument("--toy", action="store_true",
                   help="every part at CPU size: tiny shapes, 64-token sequences, 16 new tokens")
    p.add_argument("--cut-layers", type=int, help="layers of the cut 7B shape (part 1); "
                   "None: 8 of 32 (2 of 4 with --toy)")
    p.add_argument("--batch-tokens", type=int,
                   help="tokens per step in part 1; None: 32 x 4,096 (the README's 1b row), "
                        "4 x 64 with --toy")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward, part 1")
    p.add_argument("--max-micro-batch", type=int, default=8,
                   help="part 2 tries this many sequences per forward first, then halves")
    p.add_argument("--accumulation", type=int, default=2, help="micro-batches per step, part 2")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps (the first compiles)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--rounds", type=int, default=2, help="decoding: median of this many rounds")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile each block in training (both sides)")
    p.add_argument("--budget-s", type=float, default=420,
                   help="no measurement starts after this many seconds (the rest are marked)")
    a = p.parse_args()
    a.cut_layers = a.cut_layers or (2 if a.toy else 8)
    sh = shapes(a.toy, a.cut_layers)
    a.batch_tokens = a.batch_tokens or (4 if a.toy else 32) * sh["seq_len"]
    if a.batch_tokens % (sh["seq_len"] * a.micro_batch):
        raise SystemExit(f"error: --batch-tokens {a.batch_tokens} is not a multiple of "
                         f"--micro-batch {a.micro_batch} sequences of {sh['seq_len']} tokens")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # bf16 parameters from fp32 masters on GPUs, as the engine's FSDP2 does; on a CPU (the toy run)
    # fp32 throughout, and MFU against the CPU's fp32 peak
    a.param_dtype = torch.bfloat16 if device.type == "cuda" else None
    d = train.Dist(0, 1, device, one_rank_mesh(device) if {1, 2} & set(a.parts) else None)
    a.peak = train.peak_flops(d, "bf16" if a.param_dtype else "fp32")
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "peak_flops": a.peak, "toy": a.toy,
              "args": {k: v for k, v in vars(a).items() if k not in ("param_dtype", "peak")}}
    print(json.dumps(header), flush=True)
    report = Report(Path(a.out), a.budget_s, header)
    for part in sorted(a.parts):
        [part1, part2, part3][part - 1](a, d, sh, report)
    print("\n" + report.markdown(), flush=True)
    print(f"written: {Path(a.out) / 'results.md'}, {Path(a.out) / 'results.json'}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
