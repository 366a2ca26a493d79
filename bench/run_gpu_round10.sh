#!/usr/bin/env bash
# Round 10 on the lent H100 (one call): the full-size engine with aligned weights and its Triton
# kernels bundled; cold starts in fresh processes (default, and Inductor's compile pool off); one
# fd-bench comparing eager vs that engine with a profile of block 5; then, with time left, the
# bounded cache over 200 blocks (eager vs an engine built in-process).
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( 580 - ($(date +%s) - T0) )); }
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING | tail -2
python3 -m pytest -q -p no:cacheprovider tests/test_weight_file.py tests/test_kernel_cache.py 2>&1 | tail -1
python3 bench/engine_bench.py --workdir /tmp/fdw --budget 270 --build-timeout 200 --no-eager \
  --cold-env TORCHINDUCTOR_COMPILE_THREADS=1 --out "$OUT/engine-h100-cold.json" 2>&1 | grep -v -i warn | tail -24
if [ -f /tmp/fdw/engine/manifest.json ]; then
  timeout $(( $(left) - 5 )) python3 -m flashdreams.cli.bench --preset self-forcing-1.3b --random-weights \
    --decoder taehv --attention triton --backend eager,engine --engine /tmp/fdw/engine --blocks 7 --rollouts 2 \
    --profile-block 5 --out "$OUT/fdb" 2>&1 | grep -v -i warn | tail -16
fi
rm -rf /tmp/fdw
if [ "$(left)" -gt 330 ]; then
  timeout $(( $(left) - 5 )) python3 -m flashdreams.cli.bench --preset self-forcing-1.3b-rolling --random-weights \
    --decoder taehv --attention triton --backend eager,inductor --blocks 12 --rollouts 1 --steady-blocks 200 \
    --profile-block 11 --out "$OUT/fdbr" 2>&1 | grep -v -i warn | tail -12
  rm -rf "$OUT/fdbr/engines" "$OUT/fdbr/backends.png" "$OUT/fdbr/stages.png"
fi
echo "round 10 done at $(( $(date +%s) - T0 )) s"
