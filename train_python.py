"""Stage 3 of Code Llama - Python: 100B more tokens, mostly Python (Code Llama sec. 2.1, 2.2, 2.6).

Code Llama - Python starts from the code stage trained without the infilling objective (sec. 2.1,
Fig. 2): so --init is a train_code.py run (not train_infill.py), and this stage adds no document
transform: plain next-token prediction on Python (75%), other code (10%), natural language related
to code (10%) and natural language (5%) (Table 1), at a peak LR of 1e-4 (sec. 2.6). Long-context
fine-tuning (train_longctx.py) follows.

One CPU, continuing train_code.py's tiny example run (runs/code-tiny, whose hf/ holds the tokenizer)
on the standard library's asyncio package as the Python source and CPython's C headers as the other
code (a few minutes):

    STDLIB=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    INCLUDE=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    python train_python.py --init runs/code-tiny --data "$STDLIB/asyncio:0.9" "$INCLUDE:0.1" \\
        --out runs/python-tiny --steps 200 --seq-len 256 --batch-tokens 8192 --micro-batch 8 \\
        --lr 3e-4 --warmup 20 --ckpt-every 100 --eval-every 100

Eight GPUs, the paper's settings, from the code stage of the 7B model:

    torchrun --nproc_per_node 8 train_python.py --init runs/code-7b \\
        --data data/python data/code data/code_nl data/nl --out runs/python-7b \\
        --activation-checkpointing
"""

import train

DEFAULTS = dict(
    seq_len=4096,  # as in the code stage (sec. 2.6)
    # 4M tokens per batch: sec. 2.6 states it for the code stages and not separately for this one
    # (UNCONFIRMED for the Python stage)
    batch_tokens=4 * 2**20,
    steps=23_842,  # 100B tokens (sec. 2.1, Fig. 2) / 2^22 tokens per step
    mix=[0.75, 0.10, 0.10, 0.05],  # Table 1: Python, code, NL related to code, natural language
    lr=1e-4,  # "initial learning rate of 1e-4" for the Python stage (sec. 2.6), every model size
)

if __name__ == "__main__":
    train.run(train.parser(**DEFAULTS).parse_args())
