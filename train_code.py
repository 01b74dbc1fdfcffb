"""Stage 2 of Code Llama: Llama 2 trained on 500B tokens of code (Code Llama sec. 2.2 and 2.6).

Plain next-token prediction on a mix of code (85%), natural language related to code (8%) and
natural language (7%) (Table 1). The 7B and 13B models also learn infilling in this stage: that is
train_infill.py, which adds its document transform to these defaults. 34B trains without it.

One CPU, the tiny preset on real code, the asyncio package of the interpreter's standard library
(0.13M tokens, 3 epochs; 44 minutes on this project's 2-core machine while other jobs ran, loss
10.4 -> 2.7, held-out loss 3.7):

    python train_code.py --init tiny --tokenizer ../shared/data/llama2/tokenizer.model \\
        --data "$(python -c 'import asyncio, os; print(os.path.dirname(asyncio.__file__))')" \\
        --out runs/code-tiny --steps 200 --seq-len 256 --batch-tokens 2048 --micro-batch 8 \\
        --lr 1e-3 --warmup 20 --ckpt-every 50 --eval-every 50

Eight GPUs, the paper's settings, from Llama 2 7B (HF layout); big sources are best tokenized first
with `python data.py prepare` (the run would otherwise do it, on rank 0 while the others wait):

    torchrun --nproc_per_node 8 train_code.py --init meta-llama/Llama-2-7b-hf \\
        --data data/code data/code_nl data/nl --out runs/code-7b --activation-checkpointing
"""

import train

DEFAULTS = dict(
    seq_len=4096,  # sequences of 4,096 tokens (sec. 2.6)
    batch_tokens=4 * 2**20,  # 4M tokens per batch (sec. 2.6): 1,024 sequences of 4,096
    steps=119_209,  # 500B tokens (sec. 2.1, Fig. 2) / 2^22 tokens per step
    mix=[0.85, 0.08, 0.07],  # Table 1: code, natural language related to code, natural language
    lr=None,  # None: Llama 2's peak LR for the model's size, which Code Llama kept (sec. 2.6)
)


def peak_lr(args) -> float:
    """3e-4 for 7B and 13B, 1.5e-4 for 34B (and 70B): Llama 2's values (Llama 2 paper, Table 1),
    which Code Llama kept (sec. 2.6)."""
    return 1.5e-4 if train.model_args(args).num_params() > 20e9 else 3e-4


def setup(args, tok, d):
    """The stage hook: Llama 2's peak LR for the model's size when --lr is not given."""
    if args.lr is None:
        args.lr = peak_lr(args)
    return tok, None


if __name__ == "__main__":
    train.run(train.parser(**DEFAULTS).parse_args(), setup)
