#!/usr/bin/env bash
# Round 5 on the lent H100 (one call): build the full-size engine with fd-build, then the cold
# start from it in a fresh process with empty compiler caches (as on a new machine), then
# fd-bench eager vs that engine in one process, as far as the call's time allows.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( 585 - ($(date +%s) - T0) )); }
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v WARNING | tail -2
ENG=/root/fdwork/engine-sf
if [ ! -f $ENG/manifest.json ]; then
  /usr/bin/time -f "fd-build wall %e s" timeout 400 python3 -m flashdreams.cli.build --preset self-forcing-1.3b \
    --random-weights --attention triton --decoder taehv --out $ENG --no-progress -v 2>&1 \
    | grep -E "fd-build|graph|MiB|build|dit|decode|encode|Error|error" | grep -v -i warn | tail -25
fi
cp $ENG/manifest.json "$OUT/engine-sf-manifest.json" 2>/dev/null
if [ -f $ENG/manifest.json ] && [ "$(left)" -gt 90 ]; then
  COLD=$(mktemp -d)
  ( export TORCHINDUCTOR_CACHE_DIR=$COLD/inductor TRITON_CACHE_DIR=$COLD/triton
    /usr/bin/time -f "cold start: process start to first frame (fd-run 1 block, empty caches) %e s" \
      timeout 150 python3 -m flashdreams.cli.run --checkpoint $ENG --random-weights --blocks 1 --out $COLD/x.mp4 --no-progress \
      2>&1 | grep -v -i warn | tail -4 )
fi
if [ -f $ENG/manifest.json ] && [ "$(left)" -gt 100 ]; then
  timeout $(( $(left) - 10 )) python3 -m flashdreams.cli.bench --preset self-forcing-1.3b --random-weights \
    --decoder taehv --backend eager,engine --engine $ENG --attention triton --blocks 7 --rollouts 3 \
    --out "$OUT/fdb" 2>&1 | grep -v -i warn | tail -14
fi
echo "round 5 done at $(( $(date +%s) - T0 )) s"
