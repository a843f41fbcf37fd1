#!/usr/bin/env bash
# Fetch the onnxruntime C/C++ API headers from Debian trixie's libonnxruntime-dev package into a private
# folder (default: cpp/.ort), without touching the system's apt configuration or installing
# anything. The library itself comes from the installed onnxruntime Python wheel (see cmake/onnxruntime.cmake).
# Prints the include directory on success. Usage: fetch_ort_headers.sh [DEST]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/.ort}"
include="$dest/include"
if [ -f "$include/onnxruntime_cxx_api.h" ]; then
    echo "$include"
    exit 0
fi
for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "fetch_ort_headers.sh: error: $tool not found (needs a Debian-like system)" >&2; exit 1; }
done
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || { echo "fetch_ort_headers.sh: error: $keyring not found (install debian-archive-keyring)" >&2; exit 1; }
work="$(mktemp -d "${TMPDIR:-/tmp}/ort-headers.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc/preferences.d" "$work/etc/sources.list.d" "$work/deb"
cat > "$work/etc/sources.list.d/trixie.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Architectures: amd64
Signed-By: $keyring
SRC
: > "$work/etc/sources.list"
apt_opts=(-q -o "Dir::Etc::SourceList=$work/etc/sources.list" -o "Dir::Etc::SourceParts=$work/etc/sources.list.d"
          -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d" -o "Dir::State::Lists=$work/lists"
          -o "Dir::Cache=$work/cache" -o "Dir::State::status=/dev/null" -o "APT::Architecture=amd64"
          -o "Acquire::Languages=none" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" update >&2 || { echo "fetch_ort_headers.sh: error: apt-get update of Debian trixie failed (no network?)" >&2; exit 1; }
(cd "$work/deb" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >&2) \
    || { echo "fetch_ort_headers.sh: error: could not download libonnxruntime-dev from Debian trixie" >&2; exit 1; }
dpkg-deb -x "$work"/deb/libonnxruntime-dev_*.deb "$work/root"
header="$(find "$work/root" -name onnxruntime_cxx_api.h | head -n1)"
[ -n "$header" ] || { echo "fetch_ort_headers.sh: error: libonnxruntime-dev holds no onnxruntime_cxx_api.h" >&2; exit 1; }
mkdir -p "$dest.tmp" && rm -rf "$dest.tmp"/* && cp -r "$(dirname "$header")" "$dest.tmp/include"
dpkg-deb -f "$work"/deb/libonnxruntime-dev_*.deb Version > "$dest.tmp/VERSION"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "$include"
