"""The shared training engine. Every train_*.py is its stage's defaults and data transform, then
this: distributed set-up, model, optimizer, schedule, the loop, logging, checkpoints, final export.

A stage script is

    import train
    DEFAULTS = dict(seq_len=4096, batch_tokens=4 * 2**20, lr=None, steps=119_209)  # the paper's
    def setup(args, tok, d):   # optional; runs inside the engine's checks (d: rank, world, device)
        if args.lr is None:    # a default that depends on the model's size
            args.lr = 1.5e-4 if train.model_args(args).num_params() > 20e9 else 3e-4
        return tok, transform  # the tokenizer to train with, and transform(doc, rng) -> (ids,
                               # loss mask or None), or None: see data.Batches
    if __name__ == "__main__":
        train.run(train.parser(**DEFAULTS).parse_args(), setup)

One process: `python train_code.py ...`; several: `torchrun --nproc_per_node 8 train_code.py ...`
(FSDP2 over NCCL on GPUs, over gloo on CPUs). The global batch of step k is the same whatever the
number of processes, and a run started again with the same command resumes from its newest complete
checkpoint with the same losses it would have had. train_code.py's docstring has runnable commands.
"""

import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from common import fsync, fsync_tree, script_parser
from data import (IGNORE, Batches, Corpus, Dialogs, LoaderWorkers, is_dialogs, is_prepared, prepare,
                  summary)
from model import (PRESETS, ModelArgs, Transformer, args_from_hf_config, hf_tensors, init_weight,
                   load_weights, parallelize)
from tokenizer import Tokenizer

# Dense peak FLOP/s per device, (bf16, fp32), for MFU. GPUs: NVIDIA datasheets (no sparsity). CPU:
# per core, the matmul rates measured on this project's 2-core Xeon machines (AMX bf16: about 1,500
# GFLOP/s, fp32 about 370), times the threads torch uses; other CPUs will differ.
PEAK_FLOPS = {"H200": (989e12, 67e12), "H100 PCIe": (756e12, 51e12), "H100": (989e12, 67e12),
              "A100": (312e12, 19.5e12), "cpu": (750e9, 185e9)}


def parser(**defaults) -> argparse.ArgumentParser:
    """The engine's flags. A stage passes its paper values as `defaults`; --steps, --seq-len,
    --batch-tokens and --lr have no engine default: a stage sets them or the user must."""
    p = script_parser(sys.modules["__main__"].__doc__)  # the stage script's docstring
    known = set()

    def a(*flags, **kw):
        known.add(p.add_argument(*flags, **kw).dest)

    a("--init", required=True,
      help=f"HF-layout folder, a previous stage's --out, or a preset ({', '.join(PRESETS)})")
    a("--tokenizer", help="tokenizer file or folder; None: the --init folder's. Needed with a "
                          "preset, whose vocab_size then comes from the tokenizer")
    a("--data", nargs="+", required=True, metavar="PATH[:WEIGHT]",
      help="sources: directories of code, .jsonl(.gz)/.parquet files, or `data.py prepare` folders")
    a("--mix", type=float, nargs="+",
      help="weights of the --data entries given without one, in order; None: equal weights")
    a("--out", required=True, help="run folder: metrics.jsonl, ckpt/, hf/ (the final model)")
    a("--data-cache", help="where raw sources are tokenized; None: OUT/data")
    stage = {"steps": int, "seq_len": int, "batch_tokens": int, "lr": float}
    for dest, kind in stage.items():
        a("--" + dest.replace("_", "-"), type=kind, required=dest not in defaults,
          help={"steps": "optimizer steps", "seq_len": "tokens per sequence",
                "batch_tokens": "tokens per optimizer step (all processes together)",
                "lr": "peak learning rate"}[dest])
    a("--micro-batch", type=int, default=1,
      help="sequences per forward pass and process; gradients accumulate to --batch-tokens")
    # AdamW and schedule: Code Llama sec. 2.6; eps, weight decay and clipping are Llama 2's
    # (Llama 2 paper, sec. 2.2), not restated for Code Llama
    a("--warmup", type=int, default=1000, help="linear warm-up steps")
    a("--final-lr-frac", type=float, default=1 / 30, help="cosine decay ends at this times --lr")
    a("--beta1", type=float, default=0.9, help="AdamW's first-moment decay")
    a("--beta2", type=float, default=0.95, help="AdamW's second-moment decay")
    a("--eps", type=float, default=1e-5, help="AdamW's epsilon")
    a("--weight-decay", type=float, default=0.1, help="on matrices only (not norm gains)")
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    a("--seed", type=int, default=0, help="model init, data order, transforms")
    a("--base", type=float, help="RoPE base theta; None: --init's (sec. 2.4 sets 1e6)")
    a("--rope-scale", type=float,
      help="linear position interpolation (Chen et al. 2023): positions divided by this factor; "
           "None: --init's (1 unless it was scaled). Table 18's ablation of train_longctx.py: 4")
    a("--dtype", choices=["bf16", "fp32"], default="bf16",
      help="bf16: bf16 parameters on GPU under FSDP (fp32 master weights and gradient reduction), "
           "bf16 autocast otherwise, CPU included")
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
      help="recompute each block in backward (long sequences need it)")
    a("--whole-docs", action=argparse.BooleanOptionalAction, default=False,
      help="start a document that fits in a sequence at a sequence start rather than cut it; the "
           "rest of the sequence before it is padding, never a target")
    a("--loader-workers", type=int, default=0,
      help="processes per training process that build batches ahead (data.LoaderWorkers; the "
           "batches are the same as with 0, which builds them in the training process)")
    a("--compile", action="store_true", help="torch.compile each block")
    a("--ckpt-every", type=int, default=1000, help="steps between checkpoints")
    a("--keep-ckpts", type=int, default=3, help="checkpoints kept (the newest)")
    a("--eval-every", type=int, default=1000, help="steps between held-out losses (0: never)")
    a("--eval-seqs", type=int, default=32, help="held-out sequences per source")
    unknown = set(defaults) - known
    if unknown:
        raise ValueError(f"stage defaults name no flag: {', '.join(sorted(unknown))}")
    p.set_defaults(**defaults)
    return p


# --------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    mesh: object  # a DeviceMesh over all processes, None for one process (no FSDP)

    def print(self, *a):
        if self.rank == 0:
            print(*a, flush=True)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for the next allocation. By default it returns every
    block over its mmap threshold (at most 32 MB) to the system when freed, and the next one is
    mapped afresh and zeroed by the kernel page by page: a CPU training step frees and allocates
    its activations again every step (SmolLM2 at 2,048 tokens: 2.2 GB of page faults per step,
    1-3 of its ~30 CPU-seconds in the kernel; none once kept). This is what jemalloc and tcmalloc
    do, which PyTorch's CPU performance guide recommends; the cost is that the process keeps its
    peak memory. Elsewhere (no glibc) nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt's parameter numbers (malloc.h)
    libc.mallopt(m_mmap_max, 0)  # no block on its own mapping: all from the heap, reused
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # never give the heap's free top back


def setup_distributed() -> Dist:
    """torchrun's RANK / LOCAL_RANK / WORLD_SIZE, or one process without them. A GPU per process
    (by LOCAL_RANK) with NCCL when there are GPUs, the CPU with gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        keep_freed_memory()
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        mesh = init_device_mesh(device.type, (world,))
    return Dist(rank, world, device, mesh)


# --------------------------------------------------------------------------------------------------
# Model


def init_folder(init: str) -> Path:
    """The HF-layout folder --init names: the folder itself, or a previous stage's run (its hf/)."""
    for folder in (Path(init), Path(init) / "hf"):
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"--init {init}: not a preset ({', '.join(PRESETS)}) and no "
                            f"config.json in {init} or {Path(init) / 'hf'}")


def model_args(args) -> ModelArgs:
    """The architecture --init names (--base and --rope-scale applied); vocab_size is settled in
    build_model."""
    if args.init in PRESETS:
        margs = ModelArgs.from_name(args.init)
    else:
        margs = args_from_hf_config(init_folder(args.init) / "config.json")[0]
    if args.base is not None:
        margs.rope_theta = args.base
    if args.rope_scale is not None:
        if not args.rope_scale > 0:
            raise ValueError(f"--rope-scale must be positive, got {args.rope_scale}")
        margs.rope_scale = args.rope_scale
    # the export's max_position_embeddings: at least the length this run trains at (a 4k model
    # fine-tuned at 16k says 16,384, as Code Llama's configs do)
    margs.max_seq_len = max(margs.max_seq_len, args.seq_len)
    return margs


def _copy_full(p, full: torch.Tensor):
    """Copy a full-size tensor into a parameter: all of it, or under FSDP2 this rank's shard (each
    rank slices its own copy, src_data_rank=None: no communication)."""
    full = full.to(p.device, p.dtype)
    if isinstance(p, DTensor):
        full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(full)


@torch.no_grad()
def init_from_scratch(model: Transformer, seed: int):
    """Transformer.init_weights' rule (model.init_weight), applied to one full-size CPU tensor at a
    time. The weights are then the same for any number of processes and on any device (sharded
    random ops on a CPU mesh are not), and no process ever holds more than one full tensor."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        full = torch.empty(p.shape)
        init_weight(name, full, model.args.n_layers)
        _copy_full(p, full)


@torch.no_grad()
def load_hf(model: Transformer, folder: Path):
    """Load an HF-layout checkpoint into a (sharded) model tensor by tensor, never whole on one
    device, through from_pretrained's loop (model.load_weights). Embedding rows beyond the
    checkpoint's vocabulary (tokens a stage added) start at the mean row, as in resize_vocab."""
    params = dict(model.named_parameters())
    vocab = args_from_hf_config(folder / "config.json")[0].vocab_size
    load_weights(params, hf_tensors(folder), folder,
                 lambda name, t: _copy_full(params[name], t.float()), grow=vocab)


def build_model(args, tok, d: Dist, resuming: bool) -> Transformer:
    """Built on the meta device, prepared (checkpointing, compile, FSDP2), then materialized on the
    device: a big model is never whole on one device. Weights come from --init, or from the
    checkpoint the caller loads next when resuming."""
    margs = model_args(args)
    if args.init in PRESETS:
        margs.vocab_size, margs.bos_id, margs.eos_id = tok.vocab_size, tok.bos_id, tok.eos_id
    else:  # a stage may add tokens (the four infilling tokens, sec. 2.3)
        margs.vocab_size = max(margs.vocab_size, tok.vocab_size)
    with torch.device("meta"):
        model = Transformer(margs)
    # FSDP2 computes in bf16 from fp32 master weights on GPUs; elsewhere --dtype bf16 is autocast
    bf16_params = d.mesh is not None and d.device.type == "cuda" and args.dtype == "bf16"
    parallelize(model, d.mesh, torch.bfloat16 if bf16_params else None,
                args.activation_checkpointing, args.compile)
    model.to_empty(device=d.device)
    if margs.tie_embeddings and d.mesh is None:  # FSDP2 keeps the tie through to_empty; nn doesn't
        model.output.weight = model.tok_embeddings.weight
    if not resuming:
        if args.init in PRESETS:
            init_from_scratch(model, args.seed)
        else:
            load_hf(model, init_folder(args.init))
    return model


def flops_per_token(margs: ModelArgs, seq_len: int) -> float:
    """6N + 12·L·H·Q·T (PaLM App. B): N counts the matmul weights, the output layer included, the
    input embedding (a lookup) not; the second term is attention's scores and weighted sum."""
    n = margs.num_params(embeddings=False) + margs.vocab_size * margs.dim
    return 6 * n + 12 * margs.n_layers * margs.n_heads * margs.head_dim * seq_len


def peak_flops(d: Dist, dtype: str) -> float | None:
    col = 0 if dtype == "bf16" else 1
    if d.device.type == "cpu":
        return PEAK_FLOPS["cpu"][col] * torch.get_num_threads()
    name = torch.cuda.get_device_name(d.device)
    return next((v[col] for k, v in PEAK_FLOPS.items() if k in name), None)


# --------------------------------------------------------------------------------------------------
# Optimizer and schedule (Code Llama sec. 2.6)


def make_optimizer(model, args):
    # Weight decay pulls matrices toward zero; norm gains are scales around 1 and are not decayed.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    # fused: one kernel per step for all parameters instead of a dozen per tensor (a tenth of a
    # CPU training step in bench/bench_model.py; transformers' Trainer defaults to it too)
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, fused=True)


def lr_at(step: int, args) -> float:
    """Linear warm-up to --lr over --warmup steps, then cosine down to --final-lr-frac of it at
    --steps (sec. 2.6: 1,000 warm-up steps, final LR 1/30 of the peak). Steps count from 1."""
    if step <= args.warmup:
        return args.lr * step / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.final_lr_frac + (1 - args.final_lr_frac) * 0.5 *
                      (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------------
# Data


def data_sources(args) -> list[tuple[str, float]]:
    """--data PATH[:WEIGHT] entries -> (path, weight); missing weights come from --mix, else 1."""
    sources, mix = [], list(args.mix or [])
    for i, spec in enumerate(args.data):
        path, _, weight = spec.rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            path, w = spec, None
        if not path:
            path, w = spec, None
        if w is None:
            w = mix[i] if i < len(mix) else 1.0
        sources.append((path, w))
    return sources


def load_corpora(args, tok, tok_path, d: Dist) -> list:
    """Prepared folders as they are; raw sources tokenized once into --data-cache (rank 0 prepares,
    the others wait; a re-run finds the shards done); chat sources (.jsonl records holding
    "messages") encoded with `tok`, the stage's tokenizer, into data.Dialogs."""
    cache = Path(args.data_cache or Path(args.out) / "data")
    corpora = []
    for path, _ in data_sources(args):
        if is_dialogs(path):
            # Every rank encodes the dialogs itself, in memory: instruction sets are small next to
            # pretraining corpora (thousands to a few million dialogs; sec. 2.5's self-instruct set
            # is 14,000), a matter of seconds to minutes, with nothing worth caching on disk.
            corpora.append(Dialogs(path, tok, args.seq_len))
            d.print(f"data: {path}: {corpora[-1].summary()}")
            continue
        if is_prepared(path):
            corpora.append(Corpus(path))
            continue
        key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]
        folder = cache / f"{Path(path).name}-{key}"
        error = None
        if d.rank == 0:
            try:
                d.print(f"data: {path}: {summary(prepare([path], tok_path, folder))}")
            except (FileNotFoundError, ValueError) as e:
                error = str(e)
        # every rank learns how rank 0's preparation went, so that all stop with its one line
        # (a barrier would leave the others a "connection closed by peer" traceback)
        error = next((e for e in d.gather(error) if e), None)
        if error:
            raise ValueError(error)
        corpora.append(Corpus(folder))
    return corpora


# --------------------------------------------------------------------------------------------------
# Checkpoints: one folder per step, written under a temporary name and renamed when complete


def pause_point(name: str):
    """For the tests that kill a run at a chosen moment (tests/test_train.py): with
    CODELLAMA_PAUSE_AT=NAME in the environment the process says so and waits to be killed there.
    Without it, nothing."""
    if os.environ.get("CODELLAMA_PAUSE_AT") == name:
        print(f"paused at {name}", flush=True)
        time.sleep(3600)


def complete_checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "ckpt").glob("step-*") if (p / "train_state.json").is_file())


def save_checkpoint(out: Path, step: int, model, opt, batches: Batches, args, d: Dist):
    t0 = time.perf_counter()
    final = out / "ckpt" / f"step-{step:07d}"
    tmp = final.with_name(f".tmp-{final.name}")
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    # every rank writes its own shards of the model and optimizer (no gathering: a full state dict
    # on rank 0 runs out of memory at 7B-70B)
    with warnings.catch_warnings():  # DCP warns that one process means no process group: we know
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save({"model": get_model_state_dict(model),
                  "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=tmp, no_dist=d.world == 1)
    data_states = d.gather(batches.state_dict())  # each rank knows only its own rows' positions
    cuda = d.device.type == "cuda"
    rng = d.gather({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(d.device) if cuda else None})
    if d.rank == 0:
        data = {**data_states[0], "pos": {k: v for s in data_states for k, v in s["pos"].items()}}
        torch.save(rng, tmp / "rng.pt")
        (tmp / "args.json").write_text(json.dumps(vars(args), indent=1))
        (tmp / "train_state.json").write_text(json.dumps({"step": step, "data": data,
                                                          "epochs": batches.epochs()}))
        fsync_tree(tmp)
        pause_point(f"checkpoint-{step}")
        os.rename(tmp, final)
        fsync(final.parent)  # the rename itself
        for old in complete_checkpoints(out)[:-args.keep_ckpts]:
            shutil.rmtree(old)
    d.barrier()
    d.print(f"checkpoint: step {step} saved in {final} ({time.perf_counter() - t0:.1f} s)")


def load_checkpoint(ckpt: Path, model, opt, batches: Batches, d: Dist) -> int:
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=ckpt, no_dist=d.world == 1)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train_state = json.loads((ckpt / "train_state.json").read_text())
    batches.load_state_dict(train_state["data"])
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    if len(rng) == d.world:  # the same processes as before: each gets its own generator back
        torch.set_rng_state(rng[d.rank]["cpu"])
        if rng[d.rank]["cuda"] is not None and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng[d.rank]["cuda"], d.device)
    return train_state["step"]


# Flags that shape the data stream: a resume with other values would not continue the same run.
STREAM_FLAGS = ("data", "mix", "seq_len", "batch_tokens", "seed", "whole_docs")


# --------------------------------------------------------------------------------------------------
# The run


@torch.no_grad()
def evaluate(model, held_out, names, args, d: Dist, autocast) -> dict:
    """Mean loss on each source's held-out sequences, split over the processes."""
    losses = {}
    for s, x, y in held_out:
        n = len(x) // d.world  # every rank runs as many forward passes (FSDP's collectives)
        x, y = x[d.rank * n:(d.rank + 1) * n], y[d.rank * n:(d.rank + 1) * n]
        total = torch.zeros(2, dtype=torch.float64, device=d.device)
        for i in range(0, n, args.micro_batch):
            xb, yb = (torch.from_numpy(t[i:i + args.micro_batch]).to(d.device) for t in (x, y))
            with autocast:
                total[0] += model(xb, targets=yb)  # the summed loss of the targets, not IGNORE
            total[1] += (yb != IGNORE).sum()
        total = d.sum(total)
        if total[1] > 0:
            losses[f"eval_loss/{names[s]}"] = (total[0] / total[1]).item()
    return losses


def check_setup(args, setup, d: Dist, stream_flags=()):
    """Load the tokenizer, run the stage's hook (its size-dependent defaults, its tokenizer and
    transform), and check the flags, --init, the data paths and a resume's settings. Every process
    runs this before the process group exists (`d` has its rank and world), so bad input ends
    every one of them with the same one-line message."""
    try:
        model_args(args)  # a wrong --init fails before anything heavy
        if args.init in PRESETS and not args.tokenizer:
            raise ValueError(f"--init {args.init} is a preset: give --tokenizer")
        tok_path = args.tokenizer or init_folder(args.init)
        tok = Tokenizer.from_pretrained(tok_path)
        tok, transform = setup(args, tok, d) if setup else (tok, None)
        for flag in ("steps", "seq_len", "batch_tokens", "lr"):
            if getattr(args, flag) is None:
                raise ValueError(f"--{flag.replace('_', '-')} has no value: give one")
        for flag in ("steps", "seq_len", "batch_tokens", "micro_batch", "ckpt_every", "keep_ckpts"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
        if args.loader_workers < 0:
            raise ValueError("--loader-workers must be 0 or more")
        if args.batch_tokens % args.seq_len:
            raise ValueError(f"--batch-tokens {args.batch_tokens} is not a multiple of --seq-len "
                             f"{args.seq_len}")
        rows = args.batch_tokens // args.seq_len
        if rows % d.world:
            raise ValueError(f"the global batch of {rows} sequences does not split evenly over "
                             f"{d.world} processes")
        for path, _ in data_sources(args):
            if not Path(path).exists():
                raise FileNotFoundError(f"data source {path} does not exist")
        ckpts = complete_checkpoints(Path(args.out))
        if ckpts:
            saved = json.loads((ckpts[-1] / "args.json").read_text())
            changed = [f for f in (*STREAM_FLAGS, *stream_flags) if saved.get(f) != vars(args)[f]]
            if changed:
                raise ValueError(f"{ckpts[-1]} was written with other --{', --'.join(changed)}: "
                                 "resuming would not continue that run; use another --out")
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    return tok, tok_path, transform, ckpts


def setup_data(args, tok, tok_path, transform, d: Dist) -> Batches:
    """Tokenize raw sources once and build this rank's share of the batch stream. Bad data ends
    every process here with the same one-line message."""
    rows = args.batch_tokens // args.seq_len
    per_rank = rows // d.world
    try:
        corpora = load_corpora(args, tok, tok_path, d)
        return Batches(corpora, [w for _, w in data_sources(args)], args.seq_len, rows,
                       args.seed, tok, transform,
                       row_range=range(d.rank * per_rank, (d.rank + 1) * per_rank),
                       whole_docs=args.whole_docs)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None


def start_log(out: Path, step: int, args, d: Dist):
    """args.json, and metrics.jsonl cut back to the resumed step (the steps after it run again)."""
    metrics = out / "metrics.jsonl"
    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        kept = []
        for line in metrics.read_text().splitlines() if metrics.exists() else []:
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
        metrics.write_text("".join(kept))
        for stale in (out / "ckpt").glob(".tmp-*"):  # a checkpoint whose writer was killed
            shutil.rmtree(stale)
    return metrics


def train_step(step, model, opt, batches: Batches, args, d: Dist, autocast, loader=None):
    """One optimizer step on the next global batch (from `loader`, LoaderWorkers over `batches`,
    or `batches` itself): micro-batches, gradient clipping, update. Returns the loss, the gradient
    norm and the batch's counts (targets, sequences of one document, of several, padding)."""
    lr = lr_at(step, args)
    for group in opt.param_groups:
        group["lr"] = lr
    try:
        x, y = (torch.from_numpy(t).to(d.device) for t in (loader or batches).next())
    except RuntimeError as e:  # a loader worker died or failed: say so, never hang
        raise SystemExit(f"error: {e}") from None
    # The loss is the mean over all targets of the global batch, however it is split: each rank
    # sums its token losses over the global count, times world size as FSDP averages the ranks.
    # one all-reduce: the target count, and the global batch's sequences holding one document,
    # several, and padding tokens (data.Batches.packing)
    counts = d.sum(torch.tensor([(y != IGNORE).sum().item(), *batches.packing],
                                device=d.device)).tolist()
    n_targets = max(1, counts[0])
    loss_sum = torch.zeros((), device=d.device)
    for i in range(0, len(batches.row_range), args.micro_batch):
        with autocast:  # the summed loss of the targets that are not IGNORE, with the output
            # layer: model.linear_cross_entropy never holds the (B, T, V) logits
            loss = model(x[i:i + args.micro_batch], targets=y[i:i + args.micro_batch])
        (loss * d.world / n_targets).backward()
        loss_sum += loss.detach()
    loss = d.sum(loss_sum).item() / n_targets
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    if isinstance(grad_norm, DTensor):  # under FSDP2: the norm over all shards
        grad_norm = grad_norm.full_tensor()
    grad_norm = grad_norm.item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        last = complete_checkpoints(Path(args.out))
        raise SystemExit(f"step {step}: loss {loss}, gradient norm {grad_norm}: not finite. "
                         "Stopped before the update; the last good checkpoint is "
                         f"{last[-1] if last else 'none (no checkpoint yet)'}")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return lr, loss, grad_norm, counts


def run(args, setup=None, stream_flags=()):
    """Train with the engine. `setup(args, tok, d) -> (tok, transform)` is a stage's hook, given the
    flags, the tokenizer and the process (d.rank, d.world): it settles the stage's size-dependent
    defaults in `args`, and returns the tokenizer to train with (a stage may add tokens) and its
    per-document transform (see data.Batches). `stream_flags`: the stage's own flags that shape
    the data stream (a resume with other values is refused, as for STREAM_FLAGS). Bad input and
    Ctrl-C end each process with one line."""
    progress = {"step": None}
    try:
        run_training(args, setup, stream_flags, progress)
        return
    except KeyboardInterrupt:
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        where = f" at step {progress['step']}" if progress["step"] is not None else ""
        last = complete_checkpoints(Path(args.out))
        message = (f"{rank}interrupted{where}; the same command resumes from "
                   f"{last[-1] if last else 'the start (no checkpoint yet)'}")
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        raise SystemExit(message)
    # Under torchrun the first process to exit makes torchrun terminate the others: each prints
    # its line at once and gives its peers a second to print theirs (on a busy machine one may
    # reach the same error a little later), in one write: print() may write the text and its
    # newline apart, and two processes' lines then run together on the pipe they share. The
    # error file makes torchrun's closing summary name the cause too.
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (message + "\n").encode())
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        Path(os.environ["TORCHELASTIC_ERROR_FILE"]).write_text(json.dumps(
            {"message": message, "timestamp": int(time.time())}))
    time.sleep(1)
    raise SystemExit(1)


def run_training(args, setup, stream_flags, progress):
    """run()'s body; progress["step"] follows the optimizer steps for the Ctrl-C message."""
    # rank and world from torchrun's environment, before the process group exists
    before = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                  device=None, mesh=None)
    tok, tok_path, transform, ckpts = check_setup(args, setup, before, stream_flags)
    d = setup_distributed()
    out = Path(args.out)
    batches = setup_data(args, tok, tok_path, transform, d)
    d.print(json.dumps(vars(args), indent=1))
    names = [Path(p).name or p for p, _ in data_sources(args)]
    names = [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]
    d.print(f"{'source':<24} {'weight':>7} {'documents':>11} {'tokens':>15} {'epochs planned':>15}")
    for name, c, w in zip(names, batches.corpora, batches.weights):  # like Table 1 of the paper
        d.print(f"{name:<24} {w:>7.3f} {c.n_docs:>11,} {c.n_tokens:>15,} "
                f"{w * args.steps * args.batch_tokens / c.n_tokens:>15.2f}")

    try:  # a truncated or corrupt --init: every rank reads it, every rank stops with one line
        model = build_model(args, tok, d, resuming=bool(ckpts))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    opt = make_optimizer(model, args)
    step = load_checkpoint(ckpts[-1], model, opt, batches, d) if ckpts else 0
    if ckpts:
        d.print(f"resumed from {ckpts[-1]} (step {step})")
    metrics = start_log(out, step, args, d)
    per_rank = len(batches.row_range)
    d.print(f"model: {model.args.num_params() / 1e6:.1f}M parameters, {d.world} process(es) on "
            f"{d.device.type}, {batches.rows} sequences x {args.seq_len} tokens per step, "
            f"{per_rank} per process in micro-batches of {args.micro_batch}")
    fpt, peak = flops_per_token(model.args, args.seq_len), peak_flops(d, args.dtype)
    use_autocast = args.dtype == "bf16" and not (d.mesh is not None and d.device.type == "cuda")
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=use_autocast)
    held_out = batches.held_out(args.eval_seqs) if args.eval_every > 0 else []
    timings, pad_tokens = [], 0
    # forked now that `batches` holds the resumed position: the workers start from it
    loader = LoaderWorkers(batches, args.loader_workers) if args.loader_workers else None

    while step < args.steps:
        step += 1
        progress["step"] = step
        t0 = time.perf_counter()
        lr, loss, grad_norm, counts = train_step(step, model, opt, batches, args, d, autocast,
                                                 loader)
        pad_tokens += counts[3]
        dt = time.perf_counter() - t0
        timings.append(dt)
        mem = (torch.cuda.max_memory_allocated(d.device) if d.device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": args.batch_tokens / dt,
               "tokens_per_s_per_device": args.batch_tokens / dt / d.world,
               "mfu": fpt * args.batch_tokens / dt / d.world / peak if peak else None,
               "peak_mem_gb": mem, "tokens": step * args.batch_tokens,
               "targets": counts[0],  # this step's targets, all processes (padding is none)
               "seqs_one_doc": counts[1], "seqs_many_docs": counts[2],
               "pad_frac": counts[3] / args.batch_tokens}
        if args.eval_every > 0 and (step % args.eval_every == 0 or step == args.steps):
            row.update(evaluate(model, held_out, names, args, d, autocast))
        mfu = f"{100 * row['mfu']:.1f}%" if peak else "-"
        d.print(f"step {step}/{args.steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:.2f}"
                f" | {row['tokens_per_s']:,.0f} tok/s | MFU {mfu} | mem {mem:.2f} GB"
                f" | 1-doc seqs {counts[1]}/{counts[1] + counts[2]}"
                + (f" | pad {100 * row['pad_frac']:.1f}%" if counts[3] else "")
                + "".join(f" | {k} {v:.4f}" for k, v in row.items() if k.startswith("eval_")))
        if d.rank == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(out, step, model, opt, batches, args, d)

    if loader:
        loader.close()
    if timings:
        d.print(f"padding: {100 * pad_tokens / (len(timings) * args.batch_tokens):.2f}% of this "
                "session's tokens (documents kept whole: --whole-docs, infilling examples)")
    if len(timings) > 2:  # the first steps pay for warm-up (allocation, compilation)
        mean = sum(timings[2:]) / len(timings[2:])
        d.print(f"mean over steps 3+ of this session: {args.batch_tokens / mean:,.0f} tokens/s"
                + (f", MFU {100 * fpt * args.batch_tokens / mean / d.world / peak:.1f}%"
                   if peak else ""))
    d.print("epochs of each source: " + ", ".join(f"{n} {e:.3f}"
                                                 for n, e in zip(names, batches.epochs())))
    # The export is written beside hf/ and renamed once the weights and the tokenizer are both in
    # it: a run killed while exporting leaves no hf/ without a tokenizer (which a next stage's
    # --init OUT would take for a finished model); run again, it resumes and exports again.
    partial = out / ".hf-partial"
    model.save_pretrained(partial)  # every rank takes part: parameters are gathered one by one
    if d.rank == 0:
        tok.save(partial)
        pause_point("export")
        fsync_tree(partial)
        if (out / "hf").exists():
            shutil.rmtree(out / ".hf-old", ignore_errors=True)
            os.rename(out / "hf", out / ".hf-old")
        os.rename(partial, out / "hf")
        fsync(out)
        shutil.rmtree(out / ".hf-old", ignore_errors=True)
        d.print(f"exported {out / 'hf'}")
    if d.world > 1:
        # every rank leaves together, once rank 0's export is on disk: a rank that tore its
        # process group down while rank 0 still wrote the export aborted at exit now and then
        # (gloo: "terminate called without an active exception"), failing a finished job
        d.barrier()
        dist.destroy_process_group()
