#!/usr/bin/env bash
# FlashAttention-4 for a lent GPU machine, which reaches no package index and takes 64 MiB per call.
#
#   bash bench/fa4_wheels.sh prepare          # here: download the wheels (cp312, manylinux x86-64),
#                                              # re-pack the 92 MB cu13 library wheel as tar.xz (66 MB)
#                                              # and split it: .whl1/ (50 MB) and .whl2/ (the rest + the
#                                              # other wheels, ~39 MB); both ignored through .git/info/exclude
#   call 1 (carry .whl1):  bash bench/fa4_wheels.sh stage        # copies .whl1 to /tmp/fa4parts there
#   call 2 (carry .whl2, right after):  eval "$(bash bench/fa4_wheels.sh install)"   # /tmp/fa4site + PYTHONPATH
#
# A folder carried in one call is gone from the checkout in the next, so the first part waits in
# /tmp, which lasts as long as the machine stays warm (about 30 s idle). The versions are the ones
# measured in bench/results/next21-h200 .. next23-h200.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/fa4site
PARTS=/tmp/fa4parts

prepare() {
  local dl tmp
  dl=$(mktemp -d)
  tmp=$(mktemp -d)
  local plat=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64)
  for p in flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 cuda-bindings==13.0.3 \
    cuda-pathfinder==1.9.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5 \
    einops==0.8.2 protobuf==7.36.2; do
    echo "fa4_wheels: downloading $p"
    python3 -m pip download -q "${plat[@]}" -d "$dl" "$p"
  done
  (cd "$tmp" && unzip -q "$dl"/nvidia_cutlass_dsl_libs_cu13-*.whl && tar cf - . | xz -6 -T0 >"$dl/cu13.tar.xz")
  rm -rf .whl1 .whl2 "$tmp"
  mkdir -p .whl1 .whl2
  split -b 50000000 -d "$dl/cu13.tar.xz" "$dl/cu13.xz."
  mv "$dl/cu13.xz.00" .whl1/
  mv "$dl"/cu13.xz.0[1-9] .whl2/
  rm "$dl"/nvidia_cutlass_dsl_libs_cu13-*.whl "$dl/cu13.tar.xz"
  mv "$dl"/*.whl .whl2/
  rmdir "$dl"
  grep -qx '/.whl1/' .git/info/exclude 2>/dev/null || printf '/.whl1/\n/.whl2/\n' >>.git/info/exclude
  du -sh .whl1 .whl2
}

stage() {
  mkdir -p "$PARTS"
  cp .whl1/cu13.xz.* "$PARTS"/
  ls -l "$PARTS"
}

install() {
  rm -rf "$SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl2/*.whl >&2
  # The library wheel's files, unpacked over the site (pip would replace the shared folder instead).
  cat "$PARTS"/cu13.xz.* .whl2/cu13.xz.* |
    python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$SITE')"
  # nvidia-cutlass-dsl adds its packages' folder through a .pth file, which PYTHONPATH folders skip.
  echo "export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}"
}

case "${1:-}" in
  prepare | stage | install) "$1" ;;
  *)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
