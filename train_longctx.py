"""Stage 4 of Code Llama: long-context fine-tuning (LCFT, Code Llama sec. 2.4 and 2.6).

The model trained on 4,096-token sequences continues on 16,384-token ones with the RoPE base raised
from 1e4 to 1e6 (sec. 2.4): rotations then turn slower, and attention decays less with distance
(App. G.1). The base is reset when the weights are loaded (--base, default 1e6): the rotation tables
are computed from it at run time and were never stored in the checkpoint, so nothing of the old base
survives, and the exported config.json carries the new `rope_theta` and a `max_position_embeddings`
of at least --seq-len. LR 2e-5, 2M tokens per batch (1M for 34B), 10,000 steps by default; the paper
stopped Code Llama 7B at 3,000 steps and ran 34B for 11,000 (downstream instabilities, sec. 2.6):
pass --steps 3000 or --steps 11000 for those.

Sixteen thousand tokens of activations per sequence are what fills memory here, and FSDP does not
shard activations: activation checkpointing is on by default (--no-activation-checkpointing turns it
off), and attention runs through SDPA's fused causal kernels, which never build the T x T score
matrix, so memory grows linearly with the sequence length (bench/longctx_memory.py measures
it). Documents that fit in one sequence start at a sequence start
rather than being cut (--whole-docs, on by default): a long file is then seen whole, which is the
context this stage exists to teach; each step logs how many sequences hold one document or several.

One CPU, continuing train_python.py's tiny example run at 4x its sequence length (a few minutes):

    STDLIB=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    python train_longctx.py --init runs/python-tiny --data "$STDLIB/asyncio" \\
        --out runs/longctx-tiny --steps 100 --seq-len 1024 --batch-tokens 8192 --micro-batch 2 \\
        --lr 3e-4 --warmup 10 --ckpt-every 50 --eval-every 50

Eight GPUs, the paper's settings, Code Llama 7B (3,000 steps):

    torchrun --nproc_per_node 8 train_longctx.py --init runs/python-7b \\
        --data data/python data/code --out runs/longctx-7b --steps 3000
"""

import train

DEFAULTS = dict(
    seq_len=16_384,  # sec. 2.6
    batch_tokens=None,  # None: 2M tokens for 7B and 13B, 1M for 34B (sec. 2.6); see batch_tokens()
    lr=2e-5,  # sec. 2.6
    steps=10_000,  # sec. 2.6, "by default"; 3,000 for Code Llama 7B, 11,000 for 34B
    base=1e6,  # RoPE base, reset from 1e4 (sec. 2.4)
    activation_checkpointing=True,  # 16k-token activations: FSDP does not shard them
    whole_docs=True,  # long files seen whole (sec. 2.4: the point of the stage)
    # The warm-up and schedule of this stage are not stated (sec. 2.6): the engine's
    # defaults (sec. 2.6's cosine with 1,000 warm-up steps) apply; --warmup changes them.
)


def batch_tokens(args) -> int:
    """2^21 tokens (128 sequences of 16,384) for 7B and 13B, 2^20 for 34B (sec. 2.6)."""
    return 2**20 if train.model_args(args).num_params() > 20e9 else 2**21


def setup(args, tok, d):
    """The stage hook: the batch size for the model's size when --batch-tokens is not given."""
    if args.batch_tokens is None:
        args.batch_tokens = batch_tokens(args)
    return tok, None


if __name__ == "__main__":
    train.run(train.parser(**DEFAULTS).parse_args(), setup)
