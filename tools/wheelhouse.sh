#!/usr/bin/env bash
# A wheelhouse for air-gapped image builds: every wheel the Dockerfile's build stages
# install, and a pip.conf that makes them install from it alone. On a connected machine:
#
#   tools/wheelhouse.sh DIR [cpu|gpu|all] [pip download options]
#   docker build --build-context wheels=DIR --build-context weights=WEIGHTS ...
#
# cpu (default): the export stage (CPU torch, the `export` and `cpu` extras) and runtime-cpu;
# gpu: runtime-gpu; all: both. The pins (TORCH_VERSION, ORT_VERSION, ORT_GPU_VERSION) are
# read from the Dockerfile. Wheels are for this machine's Python unless the options say
# otherwise: for the real images (Python 3.12, glibc 2.36 / Ubuntu 24.04's 2.39) add
#   --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
#   --platform manylinux2014_x86_64 --platform linux_x86_64 --only-binary=:all:
# TORCH_INDEX_URL (default: the Dockerfile's, PyTorch's CPU index) is where CPU torch comes
# from; set it empty to take torch from pip's own configured sources.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:?usage: $0 DIR [cpu|gpu|all] [pip download options]}
WHAT=${2:-cpu}
shift $(($# >= 2 ? 2 : 1))

pin() { sed -n "s/^ARG $1=//p" "$ROOT/Dockerfile" | head -n 1; }
TORCH_INDEX_URL=${TORCH_INDEX_URL-$(pin TORCH_INDEX_URL)}

reqs=("setuptools>=68")  # the build backend of /src (pyproject.toml), installed offline too
case "$WHAT" in
  cpu | all) reqs+=("torch==$(pin TORCH_VERSION)" "${ROOT}[export,cpu]" "onnxruntime==$(pin ORT_VERSION)") ;;&
  gpu | all) reqs+=("${ROOT}[gpu]" "onnxruntime-gpu==$(pin ORT_GPU_VERSION)") ;;
  cpu) ;;
  *) echo "$0: cpu, gpu or all, not $WHAT" >&2; exit 2 ;;
esac
index=()
[ -n "$TORCH_INDEX_URL" ] && index=(--extra-index-url "$TORCH_INDEX_URL")

mkdir -p "$DEST"
python3 -m pip download --disable-pip-version-check -q -d "$DEST" "${index[@]}" "$@" "${reqs[@]}"
# pip download saves the project itself as an sdist when it builds it; /src is installed from
# the build context, not from here.
rm -f "$DEST"/resnet_serve-*
cat >"$DEST/pip.conf" <<'CONF'
# Written by tools/wheelhouse.sh: the image build's pip installs from /wheels only.
[global]
no-index = true
find-links = /wheels
CONF
echo "$DEST: $(find "$DEST" -name '*.whl' | wc -l) wheels"
