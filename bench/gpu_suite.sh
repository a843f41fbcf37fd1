#!/usr/bin/env bash
# Every GPU figure the project claims, in one run under one deadline: see bench/suite.py and docs/gpu-suite.md.
# It prints the Python/torch/CUDA/Triton it runs with against the checked releases, then compiles the kernels
# with the machine's Triton (python -m nearl_rt.kernels.resources --check) before any timing.
#
#   bash bench/gpu_suite.sh OUTDIR [--budget 470] [--wheels DIR] [--compile] [--ort] [--dry-run]
#   bash bench/gpu_suite.sh --prepare-wheels DIR [--python-version 3.12]   # on a connected machine
#
# --wheels DIR installs DIR/*.whl (the packages the GPU image lacks) into a private directory that only
# this run puts on PYTHONPATH; nothing is installed into the machine's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
args=() wheels=""
dry=0
while (($#)); do
  case "$1" in
    --wheels) [[ $# -ge 2 ]] || { echo "bench/gpu_suite.sh: error: --wheels needs a folder" >&2; exit 2; }
              wheels=$2; args+=("$1" "$2"); shift 2 ;;
    --dry-run) dry=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ -n $wheels ]]; then
  compgen -G "$wheels/*.whl" >/dev/null || {
    echo "bench/gpu_suite.sh: error: no .whl files in $wheels (make them with: bash bench/gpu_suite.sh --prepare-wheels $wheels)" >&2
    exit 2; }
  site=$(mktemp -d "${TMPDIR:-/tmp}/nearl-suite-site.XXXXXX")
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the interpreter only for a dry run: on a GPU machine the kernels must compile for the GPU
export TRITON_INTERPRET=$dry PYTHONUNBUFFERED=1
exec "$PY" bench/suite.py "${args[@]}"
