#!/usr/bin/env bash
# GPU benchmark of training and sampling (benchmarks/gpu.py has the details).
#   bash benchmarks/gpu.sh              one H100/H200, within 6 minutes
#   bash benchmarks/gpu.sh --smoke      every part at toy sizes on the CPU (figures meaningless)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=python
if [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
fi
# The checkout's cm package, also in the torchrun workers the script starts.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" benchmarks/gpu.py "$@"
