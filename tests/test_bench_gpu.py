"""bench/bench_gpu.py's figures (MFU, the decoding bandwidth ceiling), its training step and its
report, on the CPU. The GPU run itself is in the script's docstring."""

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_gpu as bg  # noqa: E402
import train  # noqa: E402
from model import ModelArgs  # noqa: E402


def test_mfu_reproduces_the_readme_1b_row():
    # README: the 1b preset on one H200 at 81,503 tokens/s of 4,096-token sequences is 60.2% MFU
    margs = ModelArgs.from_name("1b", vocab_size=32000)
    fpt = train.flops_per_token(margs, 4096)
    assert round(100 * bg.mfu(81503, fpt, train.PEAK_FLOPS["H200"][0]), 1) == 60.2
    assert bg.mfu(81503, fpt, None) is None


def test_decode_bytes_per_token_llama2_7b():
    # 32 blocks of 4*4096^2 (attention) + 3*4096*11008 (SwiGLU) + 2*4096 (norms), the final norm,
    # the 32000 x 4096 output layer; not the embedding table. bf16: 2 bytes each.
    weights = 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 32000 * 4096
    assert weights == 6_607_343_616
    kv = 2 * 32 * 4096 * 640  # keys and values of 640 tokens in every layer
    margs = ModelArgs.from_name("llama2-7b")
    assert bg.decode_bytes_per_token(margs, 640) == 2 * (weights + kv) == 13_550_231_552
    # grouped-query attention: the 1b preset caches 8 key/value heads of 128 dims in 18 layers
    gqa = ModelArgs.from_name("1b", vocab_size=32000)
    kv_1000 = bg.decode_bytes_per_token(gqa, 1000) - bg.decode_bytes_per_token(gqa, 0)
    assert kv_1000 == 2 * 2 * 18 * 8 * 128 * 1000


def test_datasheet_bandwidth_picks_the_longest_matching_name():
    assert bg.datasheet_bandwidth("NVIDIA H200") == 4.8e12
    assert bg.datasheet_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bg.datasheet_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert bg.datasheet_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert bg.datasheet_bandwidth("cpu") is None


def test_measure_training_runs_the_engine_step_on_cpu():
    """Our side of part 1 without FSDP or compile (the quick path): a finite loss starting near
    ln(vocab) (random weights guess uniformly), falling on a repeated batch, every parameter
    counted."""
    margs = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                      max_seq_len=128)
    a = bg.argparse.Namespace(compile=False, param_dtype=None, warmup_steps=1, steps=4,
                              peak=train.PEAK_FLOPS["cpu"][0])
    d = train.Dist(0, 1, torch.device("cpu"), None)
    row = bg.measure_training(bg.build_ours, margs, 32, 4, 2, True, a, d)
    assert row["params"] == margs.num_params()
    assert abs(row["loss_first"] - math.log(512)) < 0.3
    assert row["loss_last"] < row["loss_first"]
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert row["peak_mem_gb"] is None  # a CPU: no per-configuration peak


def test_report_writes_rows_and_skips_past_the_budget(tmp_path):
    report = bg.Report(tmp_path, budget_s=3600, header={"device": "cpu"})
    ours = report.run(1, "ours", lambda: {"tokens_per_s": 110.0, "mfu": 0.5})
    ref = report.run(1, "theirs", lambda: {"tokens_per_s": 100.0})
    report.ratio(1, "train", ours, ref, "theirs", "tokens_per_s")
    report.budget_s = -1
    called = []
    assert report.run(2, "late", lambda: called.append(1))["skipped"] == "time budget spent"
    assert not called
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["what"] for r in data["rows"]] == ["ours", "theirs", "train", "late"]
    assert data["rows"][2]["ratio"] == 1.1
    md = (tmp_path / "results.md").read_text()
    assert "| 1 | ours | 110.0 | 50% |" in md and "| 1.10x |" in md and "time budget spent" in md
