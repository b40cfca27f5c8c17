#!/usr/bin/env bash
# make device-check: `bash benchmarks/gpu.sh --smoke` run as the GPU machine runs it, on this CPU.
#
# The GPU machine has no network, no project .venv (too large to copy) and perhaps no `python`:
# its `python3` (3.12) holds torch 2.11 and the packages of benchmarks/device-requirements.txt, and
# mlflow, dvc, snakemake, clean-fid, jsonschema and diffusers are missing. This script builds such
# an environment in .device-venv/ (ignored; rebuilt when the requirements change), copies the
# working tree as a GPU run receives it (tracked and unignored files, no .venv), puts only that
# environment's python3 first on PATH and runs the smoke benchmark there to its end. A missing
# package, an API newer than torch 2.11 or a `python` call fails here as it would there.
# DEVICE_PYTHON=/path/to/python3.12 picks the interpreter; the output is kept in .device-venv/last-check.log.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.device-venv"
requirements="$root/benchmarks/device-requirements.txt"
want=3.12

works() { "$1" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" 2>/dev/null; }

find_python() {
    local candidate
    for candidate in "${DEVICE_PYTHON:-}" python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12 \
            "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
        [[ -n "$candidate" ]] && works "$candidate" && { command -v "$candidate"; return; }
    done
    if command -v uv >/dev/null && candidate=$(uv python find "$want" 2>/dev/null) && works "$candidate"; then
        echo "$candidate"
        return
    fi
    return 1
}

stamp="$venv/.installed"
digest=$(sha256sum "$requirements" | cut -c1-16)
if [[ ! -x "$venv/bin/python3" || "$(cat "$stamp" 2>/dev/null)" != "$digest" ]]; then
    if ! python=$(find_python); then
        python=$(command -v python3)
        echo "device-check: no Python $want found (set DEVICE_PYTHON); using $("$python" -V 2>&1), the closest here" >&2
    fi
    rm -rf "$venv"
    "$python" -m venv "$venv"
    echo "device-check: installing benchmarks/device-requirements.txt into $venv (with torch's CUDA libraries: about 5 GB)"
    if ! "$venv/bin/python3" -m pip install --only-binary=:all: -r "$requirements" > "$venv/pip.log" 2>&1; then
        tail -20 "$venv/pip.log" >&2
        exit 1
    fi
    echo "$digest" > "$stamp"
fi

# What the image lacks must be missing here too, or the check proves nothing.
"$venv/bin/python3" - <<'PY'
import importlib.util, sys
present = [m for m in ("mlflow", "dvc", "snakemake", "cleanfid", "jsonschema", "diffusers")
           if importlib.util.find_spec(m)]
sys.exit(f"device-check: {', '.join(present)} installed, but the GPU image lacks them" if present else 0)
PY

# The working tree as a GPU run receives it: no .venv, no ignored outputs.
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
git -C "$root" ls-files -z --cached --others --exclude-standard \
    | (cd "$root" && tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$tree"
echo "device-check: $(du -sm "$tree" | cut -f1) MiB of working tree (a GPU run takes at most 64 MiB); $("$venv/bin/python3" -V)"

# Only the environment's python3 (and the system's tools) on PATH; nothing of the project's .venv.
env -u PYTHONPATH -u VIRTUAL_ENV PYTHONNOUSERSITE=1 PATH="$venv/bin:/usr/local/bin:/usr/bin:/bin" \
    bash "$tree/benchmarks/gpu.sh" --smoke "$@" 2>&1 | tee "$venv/last-check.log"
