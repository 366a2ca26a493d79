#!/usr/bin/env bash
# fd-serve on the lent H200, in one device call (issue 18): sessions per GPU and input-to-frame latency.
#  1. Self-Forcing 1.3B rolling (random weights, Triton kernels, TAEHV): 1, 2, 3 concurrent sessions, frames/s
#     each, and input-to-frame latency through a Python client (no browser on that machine);
#  2. the arena: its sessions stepped as one batch (--batching auto is on with a GPU), 1, 8, 32 sessions.
# The server's dependencies (aiohttp, Pillow) come as wheels carried in .wheels/ (the machine has no index):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .wheels aiohttp pillow
# Results: $OUT/serve-h200/<preset>.json
set -u
export PYTHONUNBUFFERED=1
REPO=$(pwd)
python3 -m pip install -q --no-index --find-links "$REPO/.wheels" --target /tmp/deps aiohttp pillow 2>&1 | grep -v -i warn | tail -2
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/fd "$REPO" 2>&1 | grep -v -i warn | tail -2
export PYTHONPATH=/tmp/fd:/tmp/deps
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
cd /tmp
if [ -n "${FD_SERVE_VARIANTS:-}" ]; then
  # Where two sessions lose pace: the same 2-session run with each server option in turn (--window 2: a
  # session may run 2 blocks ahead of its client; --encoding raw: no JPEG encoding).
  for v in "" "--window 2" "--encoding raw" "--window 2 --encoding raw"; do
    name=$(echo "sf2 $v" | tr -c 'a-z0-9\n' '-' | sed 's/-*$//')
    timeout 120 python3 "$REPO/bench/serve_load.py" --device cuda --preset self-forcing-1.3b-rolling --sessions 2 \
      --seconds 12 --no-browser --threads 4 --serve-args "--random-weights --attention triton --decoder taehv $v" \
      --out "$OUT/$name" 2>&1 | grep "sessions:" | sed "s/^/[$v] /"
  done
  exit 0
fi
timeout 330 python3 "$REPO/bench/serve_load.py" --device cuda --preset self-forcing-1.3b-rolling --sessions 1,2,3 \
  --seconds 15 --no-browser --client-latency --threads 4 \
  --serve-args "--random-weights --attention triton --decoder taehv" --out "$OUT/serve-h200" 2>&1 | grep -v -i warn | tail -12
echo "self-forcing done at $SECONDS s"
timeout 150 python3 "$REPO/bench/serve_load.py" --device cuda --preset arena --sessions 1,8,32 --seconds 10 \
  --no-browser --client-latency --threads 4 --out "$OUT/serve-h200" 2>&1 | grep -v -i warn | tail -8
echo "serve round done at $SECONDS s"
