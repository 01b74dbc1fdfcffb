"""How far an infilling model tells its four sentinel tokens apart, and whether it ends a middle.

A model that ties its input and output embeddings (SmolLM2) and grows its vocabulary with every
new row at the mean row (model.mean_rows, as train_infill.py does) starts <PRE>, <SUF>, <MID> and
<EOT> as one vector, as input and as output. This measures, for each checkpoint:
1. the pairwise cosine of the four sentinel rows of the input embedding, against that of two
   ordinary rows of the vocabulary (--rows sampled);
2. at the end of the true middle of --tasks single-line HumanEval-infilling tasks (teacher-forced,
   PSM and SPM, SPM token-healed as eval.py does), which id the model likes best there (<EOT>,
   <MID>, another) and the mean probability of <EOT> and <MID>.

    python bench/fim_sentinels.py runs/fim-humaneval/fim/hf     # ~1 min on 2 cores
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval as ev  # noqa: E402
from common import script_parser  # noqa: E402
from sample import load  # noqa: E402


def sentinel_cosines(model, tok, rows, seed=0):
    """(4 x 4 cosines of the sentinel rows, median and 99th percentile of the cosine of two
    ordinary rows among `rows` sampled)."""
    emb = model.tok_embeddings.weight.detach().float()
    ids = [tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id]
    new = F.normalize(emb[ids], dim=1)
    pick = torch.randperm(min(ids), generator=torch.Generator().manual_seed(seed))[:rows]
    old = F.normalize(emb[pick], dim=1)
    pairs = (old @ old.T)[~torch.eye(len(pick), dtype=torch.bool)]
    return (new @ new.T).tolist(), pairs.median().item(), pairs.quantile(0.99).item()


@torch.no_grad()
def middle_ends(model, tok, tasks, mode):
    """After each task's prompt + true middle: counts of the likeliest id being <EOT>, <MID> or
    another, and the mean probabilities of <EOT> and <MID>."""
    top, p_eot, p_mid = {"eot": 0, "mid": 0, "other": 0}, 0.0, 0.0
    for t in tasks:
        prompt, healed = ev.infill_prompt(tok, t["prefix"], t["suffix"], mode)
        target = ev.infill_target(tok, t, mode, healed)
        p = model(torch.tensor([prompt + target]), last_only=True)[0, -1].softmax(-1)
        best = int(p.argmax())
        top["eot" if best == tok.eot_id else "mid" if best == tok.middle_id else "other"] += 1
        p_eot, p_mid = p_eot + p[tok.eot_id].item(), p_mid + p[tok.middle_id].item()
    return top, p_eot / len(tasks), p_mid / len(tasks)


def main():
    p = script_parser(__doc__)
    p.add_argument("ckpt", nargs="+", help="infilling checkpoints (HF-layout folders)")
    p.add_argument("--tasks", type=int, default=100, help="single-line tasks (a seeded subset)")
    p.add_argument("--rows", type=int, default=2000, help="ordinary rows sampled for cosines")
    args = p.parse_args()
    tasks = ev.subset(ev.infill_tasks(ev.read_problems(), "single"), args.tasks, 0)
    for ckpt in args.ckpt:
        model, tok = load(ckpt)
        model = model.to(torch.bfloat16)
        cos, median, high = sentinel_cosines(model, tok, args.rows)
        print(f"{ckpt}: cosines of <PRE>, <SUF>, <MID>, <EOT>: "
              + "; ".join(" ".join(f"{c:.3f}" for c in row) for row in cos)
              + f" (two ordinary rows: median {median:.3f}, 99th percentile {high:.3f})")
        for mode in ("psm", "spm"):
            top, p_eot, p_mid = middle_ends(model, tok, tasks, mode)
            print(f"  {mode}: likeliest id after the true middle: <EOT> {top['eot']}, <MID> "
                  f"{top['mid']}, other {top['other']} of {len(tasks)}; mean P(<EOT>) "
                  f"{p_eot:.3f}, P(<MID>) {p_mid:.3f}")


if __name__ == "__main__":
    main()
