#!/usr/bin/env bash
# Round 8 on the lent H100 (one call): probe the precompiled inductor engine on a tiny model
# (build, then load and run in a fresh process), then the full-size engine bench (build, eager
# reference, AOTI probe, cold start, parity), then the bounded cache over 200 blocks.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( 575 - ($(date +%s) - T0) )); }
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING | tail -2
python3 -m pytest -q -p no:cacheprovider tests/test_weight_file.py 2>&1 | tail -1
probe() {
  timeout 150 python3 -m flashdreams.cli.build --device cuda --out /tmp/tiny-eng --force > /tmp/probe.log 2>&1 &&
  timeout 60 python3 -c "
import flashdreams, torch
e = flashdreams.load('/tmp/tiny-eng'); s = e.session(seed=1); r = [s.step() for _ in range(4)]
torch.cuda.synchronize(); print('probe ok', e.load_times, r[-1].frames.shape)" >> /tmp/probe.log 2>&1
}
if ! probe; then echo "precompiled probe failed: cache mode"; export FD_INDUCTOR_MODE=cache; fi
grep -v -i warn /tmp/probe.log | tail -6; cp /tmp/probe.log "$OUT/probe.log"
python3 bench/engine_bench.py --workdir /tmp/fdw --budget 360 --build-timeout 250 \
  --out "$OUT/engine-h100.json" 2>&1 | grep -v -i warn | tail -30
if [ "$(left)" -gt 70 ]; then
  timeout $(( $(left) - 5 )) python3 -m flashdreams.cli.bench --preset self-forcing-1.3b-rolling --random-weights \
    --decoder taehv --attention triton --backend eager --blocks 12 --rollouts 1 --steady-blocks 200 \
    --out "$OUT/fdb-rolling" 2>&1 | grep -v -i warn | tail -8
fi
echo "round 8 done at $(( $(date +%s) - T0 )) s"
