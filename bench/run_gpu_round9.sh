#!/usr/bin/env bash
# Round 9 on the lent H100 (one call): the full-size engine with its Triton kernels bundled, cold
# starts in fresh processes (default, and with Inductor's compile pool off), then the bounded cache
# over 200 blocks in one fd-bench comparing eager vs a freshly built engine, with a profile.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( 580 - ($(date +%s) - T0) )); }
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING | tail -2
python3 -m pytest -q -p no:cacheprovider tests/test_weight_file.py tests/test_kernel_cache.py 2>&1 | tail -1
python3 bench/engine_bench.py --workdir /tmp/fdw --budget 230 --build-timeout 170 --no-eager \
  --cold-env TORCHINDUCTOR_COMPILE_THREADS=1 --out "$OUT/engine-h100-cold.json" 2>&1 | grep -v -i warn | tail -24
rm -rf /tmp/fdw
if [ "$(left)" -gt 200 ]; then
  timeout $(( $(left) - 5 )) python3 -m flashdreams.cli.bench --preset self-forcing-1.3b-rolling --random-weights \
    --decoder taehv --attention triton --backend eager,inductor --blocks 12 --rollouts 1 --steady-blocks 200 \
    --profile-block 11 --out "$OUT/fdb-rolling" 2>&1 | grep -v -i warn | tail -12
fi
echo "round 9 done at $(( $(date +%s) - T0 )) s"
