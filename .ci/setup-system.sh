#!/usr/bin/env bash
# System set-up for the C++ library's build and tests (cpp/, tests/test_cpp_*.py): the Debian packages
# it needs, and the onnxruntime C/C++ headers (cpp/fetch_ort_headers.sh -> cpp/.ort). Run once per machine
# (CI runs it before the tests); as root, or with sudo available. Nothing third-party enters the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(cmake g++ nlohmann-json3-dev libpng-dev libjpeg62-turbo-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup-system: installing ${missing[*]}"
    $sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
bash cpp/fetch_ort_headers.sh >/dev/null
echo "setup-system: C++ build dependencies ready"
