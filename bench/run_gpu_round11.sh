#!/usr/bin/env bash
# Round 11 on the lent H100 (one call): the full-size engine now also carrying Inductor's autotuning
# results; cold starts in fresh processes (default, then under cProfile to see where a load goes);
# then, with time left, the bounded cache over 200 blocks (eager vs an engine built in-process).
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( 585 - ($(date +%s) - T0) )); }
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING | tail -2
python3 -m pytest -q -p no:cacheprovider tests/test_weight_file.py tests/test_kernel_cache.py 2>&1 | tail -1
python3 bench/engine_bench.py --workdir /tmp/fdw --budget 260 --build-timeout 190 --no-eager \
  --cold-env FD_COLD_PROFILE=1 --out "$OUT/engine-h100-cold.json" 2>&1 | grep -v -i warn | tail -22
tar -tf /tmp/fdw/engine/kernels.tar 2>/dev/null | cut -d/ -f1 | sort | uniq -c
rm -rf /tmp/fdw
if [ "$(left)" -gt 290 ]; then
  timeout $(( $(left) - 5 )) python3 -m flashdreams.cli.bench --preset self-forcing-1.3b-rolling --random-weights \
    --decoder taehv --attention triton --backend eager,inductor --blocks 12 --rollouts 1 --steady-blocks 200 \
    --profile-block 11 --out "$OUT/fdbr" 2>&1 | grep -v -i warn | tail -12
  rm -rf "$OUT/fdbr/engines"
fi
echo "round 11 done at $(( $(date +%s) - T0 )) s"
