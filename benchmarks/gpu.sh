#!/usr/bin/env bash
# GPU benchmark of training and sampling (benchmarks/gpu.py has the details).
#   bash benchmarks/gpu.sh              one H100/H200, within 6 minutes
#   bash benchmarks/gpu.sh --smoke      every part at toy sizes on the CPU (figures meaningless)
# The interpreter: $CM_PYTHON if set, else the project's .venv, else python3 (the GPU machine has
# no .venv and may have no `python`), else python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n "${CM_PYTHON:-}" ]]; then
    python=$CM_PYTHON
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
elif command -v python3 >/dev/null; then
    python=python3
elif command -v python >/dev/null; then
    python=python
else
    echo "gpu.sh: no python3 or python on PATH (set CM_PYTHON)" >&2
    exit 2
fi
# The checkout's cm package, also in the torchrun workers the script starts.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Versions and the driver first: a run that stops at once still says what it met.
"$python" benchmarks/gpu_env.py "$@"
exec "$python" benchmarks/gpu.py "$@"
