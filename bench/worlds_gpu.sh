#!/usr/bin/env bash
# Many worlds per GPU (issue 19) on the lent H200, in one device call: fd-bench --sessions for
#  1. the embedded default world (row-independent: every world at its own block index), N = 1..64;
#  2. a large streaming model, N = 1..16: Matrix-Game 2.0 universal at 352x640 when its family is
#     registered (FD_WORLDS_BIG overrides), else Self-Forcing 1.3B rolling at 480x832 (lockstep:
#     one session of batch N, since the causal Wan plan is not row-independent).
# Results: $OUT/<name>/results.json (device, versions, one row per N).
set -u
export PYTHONUNBUFFERED=1
REPO=$(pwd)
T0=$(date +%s)
left() { echo $(( ${FD_BUDGET_S:-560} - ($(date +%s) - T0) )); }
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/fd "$REPO" 2>&1 | grep -v -i warn | tail -2
fdb() { (cd /tmp && PYTHONPATH=/tmp/fd timeout "$(( $(left) - 5 ))" python3 -m flashdreams.cli.bench "$@"); }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
DEFAULT=$(cd /tmp && PYTHONPATH=/tmp/fd python3 -c "from flashdreams import presets; print(getattr(presets, 'DEFAULT_WORLD', 'tiny'))")
fdb --preset "$DEFAULT" --sessions "${FD_WORLDS_SMALL:-1,2,4,8,16,32,64}" --blocks 30 --out "$OUT/worlds-$DEFAULT" 2>&1 | grep -v -i warn | tail -12
echo "default world done at $(( $(date +%s) - T0 )) s"
BIG=${FD_WORLDS_BIG:-$(cd /tmp && PYTHONPATH=/tmp/fd python3 -c "
from flashdreams import presets
names = presets.preset_names()
print('matrix-game-2-universal' if 'matrix-game-2-universal' in names else 'self-forcing-1.3b-rolling')")}
case "$BIG" in
  matrix-game*) SIZE="--height 352 --width 640" ;;
  *) SIZE="" ;;
esac
fdb --preset "$BIG" --random-weights --decoder taehv --attention "${FD_WORLDS_ATTN:-triton}" $SIZE \
  --sessions "${FD_WORLDS_BIGN:-1,2,4,8,16}" --blocks 6 --out "$OUT/worlds-$BIG" 2>&1 | grep -v -i warn | tail -12
echo "worlds round done at $(( $(date +%s) - T0 )) s"
