"""Code Llama - Instruct: instruction fine-tuning (Code Llama sec. 2.5).

The code model continues on dialogs: the paper's are Llama 2's proprietary RLHF V5 set and ~14,000
self-instruct question / test / solution triplets (self_instruct.py writes such records), with
rehearsal of 6% code and 2% natural language from the earlier stages' data, so the model keeps its
coding and language skills. A chat source is a .jsonl(.gz) file of {"messages": [{"role",
"content"}, ...]} records (recognized by its first record), validated and encoded in the
tokenizer's own chat layout with the loss on the answers only (data.Dialogs: Llama 2's [INST]
layout, or ChatML for SmolLM2); the other sources are plain, trained with next-token loss on every
token. --mix weighs the --data entries in order (instructions, code, language). Several dialogs are
packed per sequence, and one that fits is never cut across two (--whole-docs, on by default). The
held-out loss of the chat source (eval_loss/<file name>) is then the loss on answer tokens.

One CPU, continuing train_longctx.py's tiny example run (runs/longctx-tiny) on the records of a
self-instruct run (self_instruct.py --out runs/self-instruct), with the standard library's asyncio
package as code and the Markdown / reStructuredText under /usr/share/doc as natural language
(tokenized first: a directory source would read all of its known extensions, code included):

    STDLIB=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    python data.py prepare --data /usr/share/doc --ext md,rst --tokenizer runs/longctx-tiny/hf \\
        --out runs/data/nl
    python train_instruct.py --init runs/longctx-tiny --data runs/self-instruct/records.jsonl \\
        "$STDLIB/asyncio" runs/data/nl --out runs/instruct-tiny --steps 100 --seq-len 512 \\
        --batch-tokens 4096 --micro-batch 4 --lr 1e-4 --warmup 10 --ckpt-every 50 --eval-every 50
    python sample.py --ckpt runs/instruct-tiny/hf --instruct --prompt "Reverse a list in Python"

bench/instruct_smollm2.py fine-tunes the real SmolLM2-135M-Instruct this way and measures it.

Eight GPUs, the paper's settings, from Code Llama 7B (a previous stage's run, or HF layout):

    torchrun --nproc_per_node 8 train_instruct.py --init runs/longctx-7b \\
        --data data/instruct.jsonl data/code data/nl --out runs/instruct-7b
"""

import train

DEFAULTS = dict(
    seq_len=4096,  # unstated for Code Llama - Instruct: Llama 2's SFT length (Llama 2, sec. 3.1)
    batch_tokens=524_288,  # sec. 2.6: 2^19 tokens, 128 sequences of 4,096
    steps=9_537,  # "about 5B tokens" (sec. 2.6): 5e9 / 524,288 = 9,536.7 steps
    lr=2e-5,  # unstated in the paper: Llama 2's SFT peak LR (Llama 2 paper, sec. 3.1)
    mix=[0.92, 0.06, 0.02],  # sec. 2.5: instructions, then rehearsal of 6% code and 2% language
    whole_docs=True,  # dialogs packed several per sequence, never cut (Llama 2 SFT packs them)
    # The warm-up and decay are not stated for this stage: the engine's (sec. 2.6's cosine with
    # 1,000 warm-up steps, weight decay 0.1 as in Llama 2's SFT) apply; --warmup changes them.
)


if __name__ == "__main__":
    train.run(train.parser(**DEFAULTS).parse_args())
