#!/usr/bin/env bash
# Reproduces the committed dvc.lock of the embedded default on this clone: `dvc repro` computes
# every stage from nothing, then `python -m cm lock-diff` requires every parameter, dependency and
# output hash to equal the committed one (one line per difference, naming the stage and the file).
# Bytes are promised on the kind of machine the lock was made on (.ci/lock-machine.txt, written by
# `python -m cm machine`); on another CPU differing outputs are reported but do not fail.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export DVC_NO_ANALYTICS=1 CM_PROGRESS=0
committed=$(mktemp)
git show HEAD:dvc.lock > "$committed"
dvc repro --quiet > /dev/null
python -m cm lock-diff "$committed" dvc.lock --made-on .ci/lock-machine.txt
echo "reproduced the committed dvc.lock on $(python -m cm machine)"
