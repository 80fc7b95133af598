#!/usr/bin/env bash
# py-spy profile of resnet-serve under resnet-bench load (docs/benchmarks.md):
#   tools/profile_serve.sh REPOSITORY MODEL CLIENTS OUT [resnet-serve options...]
# Starts resnet-serve on a free local port (tuning off: the options as given), loads it with
# CLIENTS closed-loop clients for 14 s, records 10 s of it with py-spy (--subprocesses: the
# workers of --workers too; non-blocking, so the server is never paused), writes
# OUT.txt (collapsed stacks), OUT/ (the resnet-bench report) and prints the summary.
# Extra resnet-bench options (e.g. --images ../shared/data/cifar10-test-846.npz) go in
# $BENCH_ARGS. Needs py-spy (pip install py-spy).
set -euo pipefail
repo=$1 model=$2 clients=$3 out=$4
shift 4
port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
RESNET_SERVE_TUNING=off resnet-serve --repository "$repo" --models "$model" --port "$port" \
    --log-level warning "$@" &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.2; done
resnet-bench --url "http://127.0.0.1:$port" --repository "$repo" --model "$model" \
    --concurrency "$clients" --duration 14 --warmup 2 --no-offline --no-progress ${BENCH_ARGS:-} \
    --out "$out" >"$out.bench.log" 2>&1 &
bench=$!
sleep 4
py-spy record --pid "$server" --subprocesses --nonblocking -d 10 -r 97 -f raw -o "$out.txt" \
    >/dev/null
wait "$bench"
python "$(dirname "$0")/profile_summary.py" "$out.txt"
grep -A4 "## HTTP load" "$out/results.md" | tail -1
