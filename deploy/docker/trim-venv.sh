#!/bin/sh
# Drops from the runtime venv ($1) what the server never loads; run by the Dockerfile's
# venv stages. Each line is something the image was measured to carry for nothing
# (docs/deployment.md, "Image size"); the container tests then classify with what is left.
set -eu
site=$(echo "$1"/lib/python3*/site-packages)
[ -d "$site/onnxruntime" ] || { echo "trim-venv: no onnxruntime under $site" >&2; exit 1; }
cd "$site"
# onnxruntime's C API library (35 MB): the Python binding links the runtime in statically
# and does not load it. Its model tooling (quantization, transformers, tools) is the build
# step's business.
rm -rf onnxruntime/capi/libonnxruntime.so* onnxruntime/quantization onnxruntime/transformers \
  onnxruntime/tools
# numpy's Fortran wrapper generator and C headers: for building extensions.
rm -rf numpy/f2py numpy/distutils numpy/_core/include numpy/_pyinstaller
# Test suites and type stubs.
find . -depth -type d -name tests -exec rm -rf {} +
find . -name '*.pyi' -delete
