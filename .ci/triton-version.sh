#!/usr/bin/env bash
# The fused kernels checked with another Triton release than the one installed (docs/kernels.md#triton-versions):
#
#   bash .ci/triton-version.sh 3.6.0            # CI: the GPU image's Triton; ~2.5 min on 2 cores
#   bash .ci/triton-version.sh 3.6.0 --full     # every configuration for sm_90 and sm_80 (~4 more minutes)
#
# The release's wheel (~190 MB; its ptxas inside) is installed once, without dependencies, into
# ${XDG_CACHE_HOME:-~/.cache}/nearl-rt/triton-VERSION and put first on PYTHONPATH, so it stands in for the
# installed triton beside the same torch and numpy. Then, with it:
#   1. python -m nearl_rt.kernels.resources --check for sm_90 and sm_80: the CI subset (ViT-B/16, bf16 and fp32, B = 1
#      and 64, OCA image rows and USE attention with own text, both passes), or with --full every row;
#   2. the interpreter tests of the fused ops (TRITON_INTERPRET=1): tests/test_kernels_oca.py, test_kernels_use.py.
# Exits non-zero if the wheel cannot be installed, a configuration spills or exceeds shared memory, or a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash .ci/triton-version.sh VERSION [--full]"
[[ $# -ge 1 ]] || { echo ".ci/triton-version.sh: error: name the Triton release ($usage)" >&2; exit 2; }
version=$1
full=0
case ${2:-} in
  "") ;;
  --full) full=1 ;;
  *) echo ".ci/triton-version.sh: error: unknown option ${2} ($usage)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
dir=${XDG_CACHE_HOME:-$HOME/.cache}/nearl-rt/triton-$version
if [[ ! -f $dir/.complete ]]; then
  rm -rf "$dir.partial"
  "$PY" -m pip install --quiet --no-deps --no-compile --disable-pip-version-check --target "$dir.partial" \
    "triton==$version"
  touch "$dir.partial/.complete"
  rm -rf "$dir"
  mv "$dir.partial" "$dir"
fi
export PYTHONPATH="$dir:$PWD"
found=$(env -u TRITON_INTERPRET "$PY" -c 'import triton; print(triton.__version__)')
[[ $found == "$version" ]] || {
  echo ".ci/triton-version.sh: error: $dir gives triton $found, not $version" >&2; exit 1; }

subset=(--geometry vit_b16 --dtype bf16,fp32 --batch 1,64 --site oca_image,use_image+own_text)
((full)) && subset=()
echo "== triton $version: python -m nearl_rt.kernels.resources --arch sm_90,sm_80 --check ${subset[*]}"
env -u TRITON_INTERPRET "$PY" -m nearl_rt.kernels.resources --arch sm_90,sm_80 --check --summary "${subset[@]}"
echo "== triton $version: interpreter tests of the fused ops"
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_oca.py tests/test_kernels_use.py
