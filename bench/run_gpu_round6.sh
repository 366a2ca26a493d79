#!/usr/bin/env bash
# Round 6 on the lent H100 (one call): bf16 vs FP8 sessions in one fd-bench process, the bounded
# cache over 200 blocks, FP8 quality against bf16, then the FP8 kernel bench with what time is left.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( 560 - ($(date +%s) - T0) )); }
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING | tail -2
timeout 170 python3 -m flashdreams.cli.bench --preset self-forcing-1.3b --random-weights --decoder taehv \
  --attention triton --precision bf16,fp8 --blocks 7 --rollouts 2 --out "$OUT/fdb-fp8" 2>&1 | grep -v -i warn | tail -10
timeout 150 python3 -m flashdreams.cli.bench --preset self-forcing-1.3b-rolling --random-weights --decoder taehv \
  --attention triton --blocks 12 --rollouts 1 --steady-blocks 200 --out "$OUT/fdb-rolling" 2>&1 | grep -v -i warn | tail -8
[ "$(left)" -gt 80 ] && timeout $(( $(left) - 60 )) python3 bench/fp8_quality.py --out "$OUT/fp8-quality-h100.json" 2>&1 | grep -v -i warn | tail -4
[ "$(left)" -gt 60 ] && timeout $(( $(left) - 5 )) python3 bench/fp8_bench.py --budget-s $(( $(left) - 20 )) \
  --sections attention,gemm,peak --out "$OUT/fp8-h100.json" 2>&1 | grep -v -i warn | tail -30
echo "round 6 done at $(( $(date +%s) - T0 )) s"
