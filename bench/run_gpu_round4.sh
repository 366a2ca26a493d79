#!/usr/bin/env bash
# Round 4 on the lent H100: build the full-size engine (inductor, Triton kernels, TAEHV) and
# measure its cold start in a fresh process; then fd-bench eager vs that engine in one process.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING | tail -2
mkdir -p /root/fdwork
timeout 330 python3 bench/engine_bench.py --workdir /root/fdwork --budget 320 --build-timeout 230 \
  --out "$OUT/engine-h100.json" 2>&1 | grep -v -i warn | tail -22
timeout 200 python3 -m flashdreams.cli.bench --preset self-forcing-1.3b --random-weights --decoder taehv \
  --backend eager,engine --engine /root/fdwork/engine --attention triton --blocks 7 --rollouts 3 \
  --out "$OUT/fdb" 2>&1 | grep -v -i warn | tail -14
