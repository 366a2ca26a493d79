#!/usr/bin/env bash
# The model-family seam on the lent H200, in one device call:
#  1. the GPU tests (frames handed out before a slow commit, under captured graphs; engines on CUDA);
#  2. Self-Forcing 1.3B engines (random weights, bf16, 480x832, TAEHV, our Triton kernels) built by
#     the code before the seam (commit 34c82a3, unpacked into .baseline_src/ and carried) and after
#     it, then fd-bench on each, alternating old/new twice, each in a fresh process.
# Both installs go to their own --target so the two versions never mix; everything runs from /tmp so
# the checkout's folders do not shadow the installed packages.
set -u
export PYTHONUNBUFFERED=1
REPO=$(pwd)
NEW="${FD_NEW_SRC:-$REPO}"  # the code under test (a snapshot folder when other work is in flight)
T0=$(date +%s)
left() { echo $(( 590 - ($(date +%s) - T0) )); }
pip_target() { python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$2" "$1" 2>&1 | grep -v -i warn | tail -2; }
pip_target "$NEW" /tmp/fd_new
pip_target "$REPO/.baseline_src" /tmp/fd_old
run_in() { local v=$1; shift; (cd /tmp && PYTHONPATH=/tmp/fd_$v timeout "${LIMIT:-600}" python3 "$@"); }
new() { run_in new "$@"; }
old() { run_in old "$@"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
new -m pytest -q -s -p no:cacheprovider --rootdir "$NEW" "$NEW/tests/test_session_gpu.py" 2>&1 | tail -15
SF="--preset self-forcing-1.3b --random-weights --attention triton --decoder taehv"
old -m flashdreams.cli.build $SF --out /tmp/e_old 2>&1 | grep -v -i warn | tail -3
echo "old build done at $(( $(date +%s) - T0 )) s"
new -m flashdreams.cli.build $SF --out /tmp/e_new 2>&1 | grep -v -i warn | tail -3
echo "new build done at $(( $(date +%s) - T0 )) s"
for r in 1 2; do
  for v in old new; do
    [ "$(left)" -lt 45 ] && break 2
    LIMIT=$(( $(left) - 10 )) run_in $v -m flashdreams.cli.bench --backend engine --engine /tmp/e_$v --attention triton \
      --blocks 7 --rollouts 2 --quick-ceilings --out "$OUT/sf-$v-$r" 2>&1 | grep -v -i warn | tail -7
    rm -rf "$OUT/sf-$v-$r/engines"
  done
done
echo "seam round done at $(( $(date +%s) - T0 )) s"
