#!/usr/bin/env bash
# Round 2 on the lent H100: kernels, decoders, tiny-model parity in bf16/triton, and the
# full-size Self-Forcing session eager with torch attention vs our Triton kernels.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING | tail -2
timeout 100 python3 bench/gpu_smoke.py --out "$OUT/gpu-smoke-h100.json" 2>&1 | grep -v Warning | tail -8
timeout 260 python3 bench/kernels_bench.py --out "$OUT/kernels-h100.json" 2>&1 | tail -40
timeout 100 python3 bench/decoders_bench.py --out "$OUT/decoders-h100.json" 2>&1 | tail -15
timeout 160 python3 -m flashdreams.cli.bench --preset self-forcing-1.3b --random-weights --decoder taehv \
  --attention sdpa,triton --blocks 7 --rollouts 2 --out "$OUT/fdb" 2>&1 | grep -v Warn | tail -14
