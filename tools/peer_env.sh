#!/usr/bin/env bash
# Make the environment a peer of `resnet-bench --peer NAME=DIR/bin/python` runs in:
#   bash tools/peer_env.sh NAME DIR
# A virtual environment at DIR with bench/peers/NAME.txt (the framework, pinned, and
# onnxruntime at the version this checkout's environment runs) and this repository
# installed without its dependencies (the peers use contract/ and bench/peers/ only).
set -euo pipefail
name=${1:?usage: tools/peer_env.sh NAME DIR}
dir=${2:?usage: tools/peer_env.sh NAME DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
req="$root/bench/peers/$name.txt"
[[ -f $req ]] || { echo "peer_env: no $req" >&2; exit 2; }
python3 -m venv "$dir"
"$dir/bin/pip" install --quiet --upgrade pip
"$dir/bin/pip" install --quiet -r "$req"
"$dir/bin/pip" install --quiet --no-deps -e "$root"
"$dir/bin/python" -c "import onnxruntime, resnet_serve.bench.peers.common; print('peer env', '$name', 'onnxruntime', onnxruntime.__version__)"
