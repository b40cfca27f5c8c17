#!/usr/bin/env bash
# Reproduces the committed dvc.lock of the embedded default on this clone: `dvc repro` computes
# every stage from nothing, then `python -m cm lock-diff` compares its dvc.lock with the committed
# one (one line per difference, naming the stage and the file):
# - inputs (parameters, and dependencies no stage produces: code, data) must be equal everywhere;
# - derived entries (outputs, and dependencies on another stage's output) must be the same bytes on
#   the kind of machine the lock was made on (.ci/lock-machine.txt, written by `python -m cm
#   machine`); on another CPU they are reported, not failed;
# - the default's FID, KID, precision and recall must lie within the tolerances of
#   .ci/expected-metrics.json (the committed run's values, tolerances from the seed spread).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export DVC_NO_ANALYTICS=1 CM_PROGRESS=0
committed=$(mktemp)
git show HEAD:dvc.lock > "$committed"
dvc repro --quiet > /dev/null
python -m cm lock-diff "$committed" dvc.lock --made-on .ci/lock-machine.txt --metrics .ci/expected-metrics.json
echo "reproduced the committed dvc.lock on $(python -m cm machine)"
