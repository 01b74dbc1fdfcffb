"""train.py through train_code.py, end to end on CPU: FSDP over two processes gives one process's
losses, a killed run resumes to the losses of an uninterrupted one (killed mid-way or while writing
a checkpoint), the tiny preset learns from the standard library and its export loads in
transformers, and bad input stops with a clear message."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, STDLIB
import train
from data import prepare

EMAIL = STDLIB / "email"  # 30-odd real Python files, 0.4 MB
STEPS = 10
# One OpenMP thread per training process (torchrun does the same): on a busy 2-core machine two
# threads keep waiting for each other, which made these runs 3x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def flags(tokenizer):
    """tiny preset, 8 sequences of 64 tokens per step, checkpoints at steps 4, 8 and 10."""
    return ["--init", "tiny", "--tokenizer", str(tokenizer), "--seq-len", "64",
            "--batch-tokens", "512", "--micro-batch", "4", "--lr", "2e-3", "--warmup", "3",
            "--dtype", "fp32", "--ckpt-every", "4", "--eval-every", "5", "--eval-seqs", "4"]


def command(flags, data, out, *extra, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "train_code.py", *flags, "--data", str(data), "--out", str(out),
            "--steps", str(STEPS), *extra]


def run(cmd):
    # umask 022, a common default: what it lets others read, the run's files must let them read
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
                       umask=0o022)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("data") / "email"
    prepare([EMAIL], tokenizer, folder, extensions={".py": "python"}, progress=False)
    return folder


@pytest.fixture(scope="module")
def reference_out(flags, data, tmp_path_factory):
    """The uninterrupted one-process run the others are compared with."""
    out = tmp_path_factory.mktemp("reference")
    run(command(flags, data, out))
    return out


@pytest.fixture(scope="module")
def reference(reference_out):
    return metrics(reference_out)


def test_schedule():
    args = train.parser(steps=100, seq_len=64, batch_tokens=64, lr=3e-4).parse_args(
        ["--init", "tiny", "--data", "x", "--out", "y", "--warmup", "10"])
    assert train.lr_at(1, args) == pytest.approx(3e-5)
    assert train.lr_at(10, args) == pytest.approx(3e-4)
    assert train.lr_at(100, args) == pytest.approx(1e-5)  # 1/30 of the peak (sec. 2.6)
    lrs = [train.lr_at(s, args) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert (args.beta1, args.beta2, args.eps, args.weight_decay, args.grad_clip) == (
        0.9, 0.95, 1e-5, 0.1, 1.0)


def test_optimizer_decays_matrices_and_not_norm_gains():
    """AdamW with the flags' hyperparameters; weight decay on matrices only: one step with zero
    gradients shrinks every matrix by lr * weight_decay and leaves every norm gain as it was."""
    from model import ModelArgs, Transformer
    args = train.parser(steps=10, seq_len=64, batch_tokens=64, lr=1e-2).parse_args(
        ["--init", "tiny", "--data", "x", "--out", "y", "--weight-decay", "0.05",
         "--beta1", "0.8", "--beta2", "0.9", "--eps", "1e-6"])
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16))
    m.init_weights()
    opt = train.make_optimizer(m, args)
    assert all((g["betas"], g["eps"], g["lr"]) == ((0.8, 0.9), 1e-6, 1e-2)
               for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    norms = [n for n, p in m.named_parameters() if p.ndim == 1]
    assert norms and all(n.endswith("norm.weight") for n in norms)
    for n, p in m.named_parameters():
        want = before[n] if p.ndim == 1 else before[n] * (1 - 1e-2 * 0.05)
        assert torch.allclose(p, want, rtol=0, atol=1e-7), n


def test_the_update_uses_gradients_clipped_to_grad_clip(tokenizer, data):
    """train_step hands AdamW gradients whose global norm is --grad-clip (here far below the
    raw norm, which it returns for the log)."""
    import contextlib
    from data import Batches, Corpus
    from model import ModelArgs, Transformer
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(tokenizer)
    args = train.parser(steps=10, seq_len=64, batch_tokens=256, lr=1e-3).parse_args(
        ["--init", "tiny", "--data", "x", "--out", "y", "--grad-clip", "0.01",
         "--micro-batch", "2", "--warmup", "1"])
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size,
                              multiple_of=16))
    m.init_weights()
    opt = train.make_optimizer(m, args)
    seen, step = [], opt.step
    opt.step = lambda: seen.append(torch.sqrt(sum((p.grad ** 2).sum() for p in m.parameters()))
                                   .item()) or step()
    batches = Batches([Corpus(data)], [1.0], 64, 4, seed=0, tok=tok)
    _, loss, grad_norm, _ = train.train_step(1, m, opt, batches, args,
                                             train.Dist(0, 1, torch.device("cpu"), None),
                                             contextlib.nullcontext())
    assert loss > 0 and grad_norm > 0.1
    assert seen == [pytest.approx(0.01, rel=1e-4)]


def test_export_tokenizer_loads_in_transformers(reference_out):
    from test_tokenizer import assert_transformers_loads
    assert_transformers_loads(reference_out / "hf")


def test_reference_run_logs_metrics(reference):
    assert [m["step"] for m in reference] == list(range(1, STEPS + 1))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb"} <= set(m)
               for m in reference)
    assert [m["step"] for m in reference if "eval_loss/email" in m] == [5, 10]


def test_init_from_a_previous_stage_grows_the_vocabulary_and_sets_the_rope_base(reference_out,
                                                                                  tmp_path):
    """--init OUT of a finished run loads its hf/ export; a stage that adds tokens (infilling, sec.
    2.3) gets new embedding rows at the mean row; --base replaces the RoPE theta (sec. 2.4)."""
    from tokenizer import Tokenizer, extend_tokenizer
    from model import Transformer

    hf = reference_out / "hf"
    tok = Tokenizer.from_pretrained(extend_tokenizer(hf / "tokenizer.model",
                                                     tmp_path / "tokenizer.model"))
    args = train.parser(steps=1, seq_len=64, batch_tokens=64, lr=1e-4).parse_args(
        ["--init", str(reference_out), "--data", "x", "--out", str(tmp_path), "--base", "1e6"])
    d = train.Dist(rank=0, world=1, device=torch.device("cpu"), mesh=None)
    model = train.build_model(args, tok, d, resuming=False)
    old = Transformer.from_pretrained(hf)
    n = old.args.vocab_size
    assert model.args.vocab_size == tok.vocab_size > n and model.args.rope_theta == 1e6
    for name, p in old.named_parameters():
        grown = dict(model.named_parameters())[name]
        assert torch.equal(grown[:n] if grown.shape != p.shape else grown, p), name
    emb = model.tok_embeddings.weight
    assert torch.allclose(emb[n:], emb[:n].mean(0, keepdim=True).expand(tok.vocab_size - n, -1))


def test_two_processes_match_one(flags, reference, data, tmp_path):
    r = run(command(flags, data, tmp_path, nproc=2))
    assert "2 process(es)" in r.stdout
    two = metrics(tmp_path)
    assert len(two) == STEPS
    for a, b in zip(reference, two):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    assert abs(reference[-1]["eval_loss/email"] - two[-1]["eval_loss/email"]) < 1e-4
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "step-0000004", "step-0000008", "step-0000010"]
    # one log line per complete checkpoint: step, folder, seconds
    saved = re.findall(r"^checkpoint: step (\d+) saved in (\S+) \((\d+\.\d) s\)$", r.stdout, re.M)
    assert [(int(s), Path(p)) for s, p, _ in saved] == [
        (s, tmp_path / "ckpt" / f"step-{s:07d}") for s in (4, 8, 10)]
    # every file and folder written gets the modes the umask gives (0644, 0755), the hf/ export's
    # safetensors and tokenizer included: others can read a run on a shared disk
    modes = {p.relative_to(tmp_path): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes[Path("hf/model.safetensors")] == modes[Path("hf/tokenizer.model")] == 0o644
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {0o644}
    assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} == {0o755}
    assert (tmp_path.stat().st_mode & 0o777, len(modes)) > (0, 20)
    # Resuming on another number of processes: the two-process checkpoint of step 8 continued by
    # one process (the distributed checkpoint reshards; the data position is saved for all rows)
    shutil.rmtree(tmp_path / "ckpt" / "step-0000010")
    r = run(command(flags, data, tmp_path))
    assert "resumed from" in r.stdout and "step-0000008 (step 8)" in r.stdout
    for a, b in zip(reference, metrics(tmp_path)):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)


def wait_for(proc, condition, what, every=0.005):
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stdout.read()[-2000:]}")
        time.sleep(every)


def test_sigkill_mid_run_resumes_to_the_same_losses(flags, reference, data, tmp_path):
    """Killed after step 6, the run resumes to the losses of an uninterrupted one; --keep-ckpts
    2 leaves the two newest checkpoints (8 and 10) of the three."""
    cmd = command(flags, data, tmp_path, "--keep-ckpts", "2")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "metrics.jsonl"
    wait_for(proc, lambda: log.exists() and log.read_bytes().count(b"\n") >= 6, "step 6", 0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics(tmp_path)) < STEPS
    r = run(cmd)
    assert "resumed from" in r.stdout
    assert [m["loss"] for m in metrics(tmp_path)] == [m["loss"] for m in reference]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "step-0000008", "step-0000010"]


def test_loader_workers_give_the_same_run_and_resume_it(flags, reference, data, tmp_path):
    """--loader-workers 2: batches built by two forked processes give the reference losses; killed
    mid-run and started again (with workers), the run resumes to the same losses."""
    cmd = command(flags, data, tmp_path, "--loader-workers", "2")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "metrics.jsonl"
    wait_for(proc, lambda: log.exists() and log.read_bytes().count(b"\n") >= 6, "step 6", 0.05)
    proc.send_signal(signal.SIGKILL)  # the workers see their pipes close and exit
    proc.wait()
    r = run(cmd)
    assert "resumed from" in r.stdout and "padding: 0.00% of this session's tokens" in r.stdout
    assert [m["loss"] for m in metrics(tmp_path)] == [m["loss"] for m in reference]


def run_until_paused(cmd, where):
    """Start a run that stops at train.pause_point(where), wait until it is there, kill it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "CODELLAMA_PAUSE_AT": where},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == f"paused at {where}":
            break
    else:
        proc.wait()
        pytest.fail(f"the run ended before {where}: {''.join(lines)[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "".join(lines)


def test_killed_while_writing_a_checkpoint_or_the_export_resumes(flags, reference, data, tmp_path):
    """Killed with step 8's checkpoint written but not yet renamed into place: the run resumes
    from step 4. Killed again while exporting hf/: no hf/ is left half made (weights without a
    tokenizer), and the next run resumes from step 10 and exports."""
    ckpt = tmp_path / "ckpt"
    run_until_paused(command(flags, data, tmp_path), "checkpoint-8")
    partial = ckpt / ".tmp-step-0000008"
    assert (partial / "train_state.json").is_file() and not (ckpt / "step-0000008").exists()
    log = run_until_paused(command(flags, data, tmp_path), "export")
    assert "resumed from" in log and "step-0000004 (step 4)" in log
    assert not list(ckpt.glob(".tmp-*")) and (ckpt / "step-0000010").is_dir()
    assert not (tmp_path / "hf").exists()
    r = run(command(flags, data, tmp_path))
    assert "resumed from" in r.stdout and "step-0000010 (step 10)" in r.stdout
    assert [m["loss"] for m in metrics(tmp_path)] == [m["loss"] for m in reference]
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tokenizer):
    """--activation-checkpointing (model.parallelize) recomputes each block in backward, and the
    loss and every gradient are those of the plain model."""
    from model import ModelArgs, Transformer, parallelize
    from data import Tokenizer
    torch.manual_seed(0)
    margs = ModelArgs.from_name("tiny", vocab_size=Tokenizer.from_pretrained(tokenizer).vocab_size)
    plain, checkpointed = Transformer(margs), parallelize(Transformer(margs), None, None, True)
    plain.init_weights()
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    for m in (plain, checkpointed):
        m.layers[1].attention.register_forward_hook(lambda *_, m=m: calls.append(m))
    x = torch.randint(0, margs.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (plain, checkpointed):
        logits = m(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
    assert [calls.count(plain), calls.count(checkpointed)] == [1, 2]  # recomputed in backward
    assert losses[0] == losses[1]
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-4), ("bf16", 5e-3)])
def test_the_engine_step_matches_the_logits_step_on_smollm2(smollm2_dir, tmp_path, dtype,
                                                            tolerance):
    """Issue 23: the engine's step (its loss by model.linear_cross_entropy, without the (B, T, V)
    logits) against the step before it (the model's fp32 logits, then F.cross_entropy:
    bench_train.PlainLoss), both through train.train_step, from SmolLM2-135M-Instruct on the same
    FIM batches of the email package cut into 30-line files (whole infilling examples, so padding:
    41 ignored targets in step 1): 2 optimizer steps of 6 x 256 tokens in one micro-batch (two
    chunks of the fused loss: 1,365 rows, then 171), LR 1e-4.
    In fp32 the losses agree to float rounding (measured: 3e-7 at both steps); under bf16 autocast
    to bf16 noise, which the update carries into the second loss (3e-7, then 4.5e-4; 2.6e-3 on
    the unsplit email files). Planted in a copy of model.py, keeping the gradient of the rows of
    ignored targets moved step 2's loss by 1.5e-2 (fp32); the unit test of linear_cross_entropy
    (tests/test_model.py) catches that, a dropped last chunk, a target off by one and counted
    ignored targets too."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_train
    (tmp_path / "pieces").mkdir()
    for f in sorted((STDLIB / "email").glob("*.py")):
        lines = f.read_text().splitlines(keepends=True)
        for i in range(0, len(lines), 30):
            (tmp_path / "pieces" / f"{f.stem}_{i}.py").write_text("".join(lines[i:i + 30]))
    flags = ["--init", str(smollm2_dir), "--data", str(tmp_path / "pieces"), "--data-cache",
             str(tmp_path / "data"), "--steps", "10", "--seq-len", "256", "--batch-tokens",
             "1536", "--micro-batch", "6", "--lr", "1e-4", "--warmup", "1", "--eval-every", "0",
             "--dtype", dtype]
    d = train.Dist(0, 1, torch.device("cpu"), None)
    losses = {}
    for side in ("main", "engine"):
        step, _ = bench_train.build_side(side, flags + ["--out", str(tmp_path / side)], d)
        losses[side] = [step(k) for k in (1, 2)]
    print(losses)
    assert losses["main"][1] != losses["main"][0]  # the first update moved the model
    for a, b in zip(losses["main"], losses["engine"]):
        assert abs(a - b) < tolerance, losses


def test_checkpoint_files_reach_the_disk_before_the_rename(flags, data, tmp_path, monkeypatch):
    """Every file of a checkpoint is fsynced before the folder is renamed into place, and the
    rename itself (its parent folder) after: a power cut cannot leave a checkpoint that looks
    complete with empty files in it."""
    events = []
    fsync, rename = os.fsync, os.rename

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        rename(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", record_rename)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = train.parser().parse_args(map(str, [
        *flags, "--data", data, "--out", tmp_path, "--steps", "1", "--batch-tokens", "128",
        "--ckpt-every", "1", "--eval-every", "0"]))
    train.run(args)
    final = tmp_path / "ckpt" / "step-0000001"
    tmp = final.with_name(".tmp-step-0000001")
    i = events.index(("rename", str(tmp), str(final)))
    synced = {e[1] for e in events[:i] if e[0] == "fsync"}
    files = [p.relative_to(final) for p in final.rglob("*")]
    assert len(files) >= 4 and all(str(tmp / f) in synced for f in files), (files, synced)
    assert ("fsync", str(final.parent)) in events[i:]


def test_stdlib_training_lowers_the_loss_and_exports_for_transformers(flags, tmp_path):
    transformers = pytest.importorskip("transformers")
    from data import Tokenizer
    from model import Transformer

    # a raw directory of real Python files: the run tokenizes it into OUT/data itself
    run([sys.executable, "train_code.py", *flags, "--data", str(EMAIL), "--out", str(tmp_path),
         "--steps", "150", "--lr", "3e-3", "--warmup", "15", "--micro-batch", "8",
         "--ckpt-every", "150", "--eval-every", "75"])
    rows = metrics(tmp_path)
    start, end = rows[0]["loss"], sum(m["loss"] for m in rows[-10:]) / 10
    assert start > 6.5 and end < start - 2, (start, end)  # ln(1024) = 6.9 at the start
    assert rows[-1]["eval_loss/email"] < rows[74]["eval_loss/email"] < start - 1
    assert (tmp_path / "data").is_dir() and (tmp_path / "hf" / "tokenizer.model").is_file()
    ours = Transformer.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf",
                                                           torch_dtype=torch.float32).eval()
    tok = Tokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tok.encode((EMAIL / "utils.py").read_text()[:400], bos=True)])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() < 1e-4


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(flags, data, tmp_path):
    r = subprocess.run(command(flags, data, tmp_path, "--lr", "1e30", "--ckpt-every", "1"),
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    message = r.stderr.strip().splitlines()[-1]
    assert "not finite" in message and message.startswith("step ")
    step = int(message.split()[1].rstrip(":"))
    last = train.complete_checkpoints(tmp_path)
    assert last and last[-1].name == f"step-{step - 1:07d}" and f"{last[-1]}" in message


@pytest.mark.parametrize("source, message", [("missing", "does not exist"),
                                             ("empty", "no files with a known extension")])
def test_bad_data_is_a_clear_error(flags, tmp_path, source, message):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "train_code.py", *flags, "--data", str(tmp_path / source),
                        "--out", str(tmp_path / "out"), "--steps", "2"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error:")
    assert message in r.stderr and "Traceback" not in r.stderr


def test_under_torchrun_bad_data_is_one_line_per_process(flags, tmp_path):
    """Rank 0 tokenizes a raw source and finds nothing in it: every process stops with its line,
    no process with a traceback (a peer's "connection closed"), and torchrun's summary names it."""
    (tmp_path / "empty").mkdir()
    r = subprocess.run(command(flags, tmp_path / "empty", tmp_path / "out", nproc=2), cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=600)
    line = f"error: data source {tmp_path / 'empty'}: no files with a known extension"
    ours = [s for s in r.stderr.splitlines() if s.startswith("error:")]
    assert r.returncode != 0 and len(ours) == 2 and all(s.startswith(line) for s in ours), r.stderr
    assert "[rank" not in r.stderr and "Connection closed" not in r.stderr
    assert f"traceback : {line}" in r.stderr  # torchrun's own summary


def test_ctrl_c_under_torchrun_is_one_line_per_process(flags, data, tmp_path):
    proc = subprocess.Popen(command(flags, data, tmp_path, "--steps", "1000", nproc=2),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    log = tmp_path / "metrics.jsonl"
    wait_for(proc, lambda: log.exists() and log.read_bytes().count(b"\n") >= 5, "step 5", 0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: torchrun and its workers
    _, err = proc.communicate(timeout=120)
    ours = sorted(s for s in err.splitlines() if re.match(r"rank \d: ", s))
    assert [s.split(":")[0] for s in ours] == ["rank 0", "rank 1"], err[-3000:]
    for s in ours:  # the step it stopped at, and the checkpoint the same command resumes from
        step = int(re.search(r"interrupted at step (\d+); the same command resumes from (\S+)$",
                             s).group(1))
        assert s.endswith(str(tmp_path / "ckpt" / f"step-{step // 4 * 4:07d}"))
    assert "[rank" not in err and "KeyboardInterrupt" not in err
