#!/usr/bin/env bash
# One GPU suite in place of the round scripts: named parts, each one function, run in the order
# given inside one wall-clock budget (one device call), results under <out>/<name>/.
#
#   bash bench/gpu_suite.sh --help                          # the parts and groups
#   bash bench/gpu_suite.sh --name issue22-h200 issue22     # on the GPU machine (results in $OUT/issue22-h200/)
#   bash bench/gpu_suite.sh --smoke --name smoke issue22    # here, on the CPU: tiny shapes, Triton interpreter
#   bash bench/gpu_suite.sh --dry-run issue22               # print the commands only
#
# Results: <out>/<name>/suite.json (device, versions, git commit, each part's exit code and seconds),
# suite.log (every part's whole output) and one JSON per part. <out> is $FD_SUITE_OUT, else $OUT (the
# device machine's return folder), else bench/results. The device machine returns at most 8 files,
# so parts write one JSON each and no plots (fd-bench's plots can be redrawn from its results.json:
# python -c "import json,sys; from pathlib import Path; from flashdreams.benchmark.report import plots;
# plots(json.load(open(sys.argv[1])), Path('.'))" FILE).
set -u
export PYTHONUNBUFFERED=1

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
NAME=suite
SMOKE=0
DRY=0
BUDGET=${FD_BUDGET_S:-540}
WORK=${FD_SUITE_WORK:-/tmp/fd-suite}
PARTS=()

# name | seconds it may take at most | what it measures (the old round scripts it replaces)
PART_TABLE="
env|30|device, driver, versions, git commit (always run first)
attention|190|issue 22: attention TFLOP/s at q 4680 / kv 4680..32760: cuDNN, our bf16 and FP8 kernels (with their quantization, per call and through a ring fp8 shadow), config sweeps, matmul peak in the same run
attention-lingbot|150|issue 15: the attention part at LingBot-World Fast's steady shape (q 4524, 40 heads, full ring of 27144): cuDNN, our bf16 and FP8 kernels, the FP8 pre-pass and shadow update, FP8 config sweeps (64-key tiles, a 168-register cap for three CTAs an SM)
sf-fp8|330|issue 22: fd-bench Self-Forcing 1.3B block 5 (random weights, 480x832, TAEHV, Triton) in bf16 and FP8 in one invocation with a block-5 profile, then the FP8 quality over 7 blocks (latents rel. L2, decoded PSNR) (round 6)
gpu-smoke|100|tiny model: bf16 vs fp32, CUDA graphs vs eager, CUDA vs CPU (round 2)
kernels|260|every Triton kernel vs its twin and SDPA, the bf16 ring-attention config sweep, memory-bound kernels vs copy bandwidth (round 2)
decoders|100|Wan VAE and TAEHV per block at 480x832 (round 2)
sf-eager|170|fd-bench Self-Forcing eager, torch SDPA vs our Triton kernels (round 2)
fp8-kernels|240|FP8 attention and linears vs bf16, peak, FP8 config sweep (bench/fp8_bench.py) (round 6)
lingbot-fp8-block|110|issue 15: fd-bench LingBot-World Fast 464x832 FP8 with every default (camera bf16, fast accumulation), 8 blocks, block-7 profile
engine|330|bench/engine_bench.py: build the full-size engine, cold start in a fresh process, engine vs eager; FD_SUITE_ENGINE_ARGS adds options (--no-eager, --cold-env K=V) (rounds 4, 8, 9, 10, 11)
build|580|fd-build of the full-size engine, when the engine part left none (round 5) (on the H200 it did not finish in 400 s, next24-h200: give it a call of its own)
cold|150|cold start from the built engine: process start to first frame, 3 fresh processes with empty compiler caches, median (round 5; issue 22 target 6)
cold-pyc|240|the cold part again after byte-compiling the packages a cold start imports (torch, sympy, triton, ...; the lent image ships no .pyc files, a normal pip install writes them)
cold-groups|150|issue 22 target 6: the cold-pyc processes with Triton's group files installed as the build wrote them (FD_BUNDLE_KEEP_GROUPS=1, the behaviour before the install repointed them): run after cold-pyc in one call, the fix's effect on one machine
cold-full|150|issue 22 target 6: the cold-pyc processes with the kernel install as it was (every file of each Triton entry, IR text included, written by one thread: FD_BUNDLE_IR=1 FD_INSTALL_THREADS=1): run after cold-pyc in one call, the slim threaded install against it on one machine
build-fp8|300|fd-build of the full-size engine in FP8 (--precision fp8 --attention triton: FP8 linears, FP8 ring attention, the ring's e4m3 shadow as session state) into its own folder, for engine-fp8 and cold-fp8; then each decode graph's channels-last weights and the ops of ours it traced
engine-fp8|200|fd-bench Self-Forcing 1.3B FP8 eager (CUDA graphs) against the FP8 engine built by build-fp8, one invocation, 7 blocks, block-5 profiles
omni-build|540|issue 16: fd-build of the full-size OmniDreams single-view engine (704x1280, random weights, Triton, the pixel HD-map encoder in its CUDA forms, LightTAE) into its own folder, for omni-engine; the encoder graphs' NDHWC weights and ops of ours listed
omni-engine|300|issue 16: fd-bench OmniDreams 704x1280 eager (CUDA graphs) against the engine built by omni-build, one invocation, 6 chunks, chunk-4 profiles
cold-fp8|200|issue 22 target 6 in FP8: the cold-pyc processes (byte-compiled packages, 3 fresh processes with empty compiler caches) from the FP8 engine of build-fp8
decode-probe|60|issue 22: where the traced TAEHV decode leaves NHWC: each layout-picked call site (bias/ReLU, MemBlock join, frame split, narrow last conv) eager and under the engine's export, full and tiny width on the device, and the ops of ours the exported decode graph holds (bench/decode_layout_probe.py)
engine-gpu-tests|240|on CUDA: FP8 engines (tests/test_fp8_engine.py: the tiny model built in FP8 and bf16 on the GPU, one DiT call of the FP8 engine against the eager FP8 session's, the rollout inside FP8's bound, precision fixed at build time, a snapshot restored bit for bit) and a TAEHV engine's decode graphs traced and loaded with channels-last conv weights, frames as the eager session's, and an OmniDreams engine's HD-map encoder graphs with their NDHWC 3-D conv weights, latents as the eager session's (tests/test_export_engine_gpu.py, its taehv and omnidreams tests)
cold-warm-up|150|issue 22: the cold start again with fd-bench --warm-up (block kinds run and captured before block 0): process start to first frame including it, and the first rollout's blocks at steady speed
warm-up-eager|90|issue 22 target 6: Self-Forcing 1.3B eager (no build) in a fresh process with --warm-up: the first rollout's blocks after the warm-up against the steady ones (block 0 must not carry the warm-up's tail)
cold-profile|120|issue 22 target 6: after byte-compiling (as cold-pyc), one cold process under cProfile: where the load's seconds go (top functions by cumulative and own time, who compiled Triton kernels) and which kernels the load compiled that the engine's bundle lacked (next33-h100 also ran three cold processes with TORCHINDUCTOR_COMPILE_THREADS=1 here: 12.08 s against 11.68 s)
eager-vs-engine|300|fd-bench eager vs the built engine in one process, profile of block 5 (rounds 4, 5, 10)
rolling|300|bounded cache (sink 1 + window 11) over 200 blocks, eager vs an engine built in-process, profile of block 11 (rounds 6, 8, 9, 10, 11)
probe|210|a tiny engine built and run on CUDA in a fresh process (round 8)
aoti-probe|300|whether AOTInductor packages load on this image now (they segfaulted on torch 2.11+cu130): a torch-only MLP package, then the tiny aoti engine (fd-build --aoti-force), each loaded in a fresh process (bench/aoti_probe.py)
worlds-arena|90|issue 19: many worlds of the default world (arena), bf16, N = 1..256 (fd-bench sessions, one N at a time: bench/worlds_rows.py)
worlds-arena-profile|60|issue 19: the arena at N = 1 and 64 with one profiled step each (where the N = 64 block's 3.7 ms go)
worlds-arena-long|180|issue 19: the arena at N = 1 and 64, 1000 blocks each, in three fresh processes (the bar's ratio with a steady N = 1 baseline)
worlds-arena-fp32|45|issue 19: the arena in float32 at N = 1 and 64 (comparison)
worlds-mg|170|issue 19: Matrix-Game 2.0 universal 352x640 (random weights, TAEHV, Triton), lockstep N = 1..16
worlds-mg-fp8|150|issue 19 bar 2 within one precision: Matrix-Game 2.0 universal 352x640 (random weights, TAEHV, Triton) in FP8, lockstep N = 1 and 8
mg-fp8|240|issue 14: fd-bench Matrix-Game 2.0 universal 352x640 (random weights, TAEHV, Triton) in bf16 and FP8 in one invocation, 8 blocks, block-5 profiles, then FP8 vs bf16 quality over 7 blocks (latents rel. L2, decoded PSNR)
mg-taehv|100|issue 14: fd-bench Matrix-Game 2.0 universal 352x640 single session, TAEHV, Triton, 8 blocks, block-5 profile
mg-wanvae|110|issue 14: the same with the Wan VAE decoder (the preset's)
mg-splits|330|issues 14, 22: Matrix-Game 2.0 universal 352x640 (TAEHV, Triton) blocks with the bf16 ring attention at its picked key splits, at FD_ATTN_SPLITS=2, then picked again (three fd-bench processes on one machine: the kernel alone ran 2 splits 13% faster, next59)
gpu-tests|200|pytest -m gpu: the new families' GPU tests (cosmos, omnidreams, flashvsr, wan22, block-sparse kernel, matrixgame)
flashvsr|180|issue 20: FlashVSR 768x1408 sparse 2.0 steady FPS, sparse kernel vs dense SDPA, 1152x1920 (1080p) FPS (bench/family_parts.py)
flashvsr-more|240|issue 20: Self-Forcing -> FlashVSR 2x chain FPS, sparse 1.5 and dense FPS, the 1080p kernel rate
omnidreams|200|issue 16: OmniDreams 704x1280 chunk (frames out, whole chunk), Cosmos-Predict2.5 2B CFG evaluation TFLOP/s (bench/family_parts.py)
cosmos|200|issue 16: Cosmos-Predict2.5 2B alone: one CFG evaluation (3 timed), TFLOP/s vs the matmul peak (bench/family_parts.py)
mg-steady|260|issue 14: Matrix-Game 2.0 universal 352x640 TAEHV, one rollout of 1000 blocks (fd-bench --steady-blocks: jitter, memory)
omnidreams-triton|120|issue 16: the OmniDreams chunk with our Triton attention kernels (--omni-attention triton)
lingbot-fp8|150|issue 15: bench/lingbot_bench.py in FP8 (CUDA graphs)
lingbot|150|issue 15: bench/lingbot_bench.py block latency, bf16, CUDA graphs
wan22-mem|200|bench/wan22_memory.py --measure (wan2.2-a14b-t2v-rolling, 4 blocks)
mg-memory|220|issue 14: Matrix-Game 352x640 TAEHV, 1000 blocks with new actions every block: allocated memory per block (flat?), p99/p50, action-to-frame latency
omni-fp8|200|issue 16: fd-bench OmniDreams 704x1280 chunk in bf16 and FP8 (Triton), then FP8 vs bf16 quality over 7 chunks
lingbot-fp8-quality|200|issue 15: LingBot-World Fast stream, FP8 vs bf16 quality over 7 blocks (latent rel. L2, frame PSNR)
wan22-speed|300|issue 21: fd-bench Wan2.2 A14B T2V (both experts, Triton, CUDA graphs, TAEHV) 6 blocks, block-5 profile, peak memory
mg-inductor|360|issue 14: Matrix-Game 352x640 TAEHV through an inductor engine built in-process (fuses the ~8000 small elementwise launches eager leaves: 25% of the eager block), block-5 profile
wan22-sdpa|220|issue 21: Wan2.2 A14B T2V block 5 with cuDNN attention (sdpa) instead of our ring kernel, bf16, CUDA graphs, TAEHV
wan22-inductor|560|issue 21: Wan2.2 A14B T2V through an inductor engine built in-process, Triton attention, bf16, block-5 profile
fused-kernels|90|issues 16, 14: on CUDA, the Cosmos q/k norm + rotate-half RoPE + ring-write kernel vs its twin and the DiT path, the short-query action attention, the OmniDreams CUDA-graph stream and its FP8 ring shadow vs per-call quantization
attn-splits|60|issues 21, 22, 16: ring attention with 1/2/3 key splits at each model's steady shape (SF, Wan2.2 A14B, OmniDreams, LingBot, Matrix-Game) and the FP8 pre-pass with 4/8/16 warps (bench/attention_splits_bench.py)
op-sources|200|issues 16, 22: which Python lines launch a steady block's GPU time (torch profiler over one eager step, ops by shapes and calling frames): OmniDreams 704x1280 FP8 and Self-Forcing 1.3B FP8 with TAEHV (bench/op_sources.py)
narrow-convs|120|issue 16: the cuDNN convs with few channels of OmniDreams' frames-out path (TAEHV's 64 -> 3 last conv, the HD-map encoder's 48- and 24-channel convs) as they are and with channels zero-padded, graph-timed, real channels compared; TAEHV's steady decode with each of its switches off and on, the MemBlock join pass included (bench/narrow_conv_bench.py)
rows-tests|120|issue 22: on CUDA, the FP8 attention's quantized-rows output (merge_rows_fp8 against merge + the linear's quantization, the Gluon kernel at head dim 128), the fp8-shadow tests and the Gluon kernel's own (test_fp8_attention.py and test_fp8_attention_hopper.py, their rows, shadow and hopper tests)
ring-tests|300|issue 22: on CUDA, the FP8 attention's quantized-rows output and fp8-shadow tests and the Gluon kernel's (test_fp8_attention.py and test_fp8_attention_hopper.py, their rows, shadow and hopper tests), then tests/kernels/test_ring_attention.py (the bf16 and FP8 ring-attention kernels against their twins, FD_ATTN_SPLITS; narrow-tests ran out of time before most of them in next89)
ring-split-tests|200|issue 22: on CUDA, tests/kernels/test_ring_attention.py alone (the bf16 and FP8 ring-attention kernels against their twins, their key splits merged through attention_merge._merge_parts; ring-tests without the rows tests)
narrow-tests|300|issue 16: on CUDA, the narrow last conv kernel (bf16 vs cuDNN), TAEHV's decode ending in it, the AdaLN tile rule, the FP8 row-chunk rule (tests/kernels/test_narrow_conv.py, tests/test_taehv.py, tests/kernels/test_adaln.py, tests/kernels/test_fp8_linear.py, tests/test_wan_vae.py: the HD-map encoder forms on cuDNN; tests/kernels/test_bias_act.py, test_upsample_frames.py, test_memblock_join.py: TAEHV's passes; tests/kernels/test_ring_attention.py: the bf16 kernel and FD_ATTN_SPLITS)
taehv-tests|150|issues 22, 14: on CUDA, TAEHV and its Triton passes only (tests/test_taehv.py, tests/kernels/test_memblock_join.py, test_bias_act.py, test_upsample_frames.py, test_narrow_conv.py): the MemBlock input and memory update as one pass against the torch copies, the decode through every switch
row-tiles|90|issue 22 target 5: the AdaLN row passes (fused residual + norm, FP8 out) under other row tiles (rows a program, warps) at Self-Forcing, OmniDreams and LingBot widths, bit-equal checked, GB/s (bench/row_tiles_bench.py)
row-chunks|60|issues 22, 15: the FP8 linears' activation pass (GELU fused) with rows held as power-of-two chunks vs one next_pow2 tile, at SF, LingBot and Matrix-Game widths, same tensors, bit-equal checked (bench/row_chunks_bench.py)
cublaslt-workspace|120|issue 22 targets 3 and 5: the GEMMs of a DiT layer (FP8 with row-wise scales and fast accumulation, and bf16) in CUDA graphs under cuBLASLt workspace sizes (default and 0; a process each; Self-Forcing, Matrix-Game, LingBot and OmniDreams shapes, FP8 and bf16): time, kernels, and the memset each GEMM adds (~930 a FP8 block) (bench/cublaslt_workspace_bench.py)
sf-fp8-workspace|200|issue 22 target 3: Self-Forcing 1.3B FP8 block 5 with torch's cuBLASLt workspace (FD_FP8_WORKSPACE_FREE=0) and with CUBLASLT_WORKSPACE_SIZE=${FD_SUITE_WORKSPACE:-0} KiB (0: no split-K memsets, an FP8 load's default since next113), own processes alternating torch's / set / torch's / set on one machine, 7 blocks each, block-5 profiles
lingbot-fp8-workspace|240|issue 15, issue 22 target 3: LingBot-World Fast stream FP8 (every default) with torch's cuBLASLt workspace (FD_FP8_WORKSPACE_FREE=0) against the FP8 load's default (no workspace, no memset per FP8 GEMM), own processes on one machine, 6 blocks each, block-5 profiles
gelu-quantize|60|issues 16 and 22: the FP8 activation pass with a GELU fused, erf by libdevice vs the erfc fit, the fit and the tanh form with and without fast math, and no GELU, at OmniDreams' and Self-Forcing's FFN hidden, same tensor (bench/gelu_quantize_bench.py)
cudnn-bm|260|issues 14, 16: cuDNN's convolution algorithm search off vs on in one fd-bench run each: Matrix-Game 352x640 with the Wan VAE, OmniDreams 704x1280 chunk (HD-map encoder + VAE decode) in bf16 and FP8
vae-tests|60|issues 14, 16: on CUDA, the channels-last and narrow-form Wan VAEs against the NCDHW one (decode stream, encode), the norm kernel's padded form, the HD-map encoder's stream, the OmniDreams CUDA-graph stream, the GELU epilogue route
worlds-tests|240|issue 19: on CUDA, the palette-snap kernel against its twin and in the arena step, pinned host frames, the batched worlds and the Gymnasium env, snapshots restored under captured CUDA graphs
serve-spares|150|fd-serve: a new player's open and first blocks on a parked session renewed for it (its captured graphs kept) against a new session, Self-Forcing 1.3B bf16, alternated in one process, frames compared (bench/serve_spares_bench.py)
session-tests|150|issue 22 target 6: on CUDA, tests/test_session_gpu.py alone: captured graphs against eager, frames before the commit, warm-up, recordings and snapshots under graphs (~45 s on an H100)
attention-forms|120|issue 22 target 1: attention TFLOP/s at q 4680 / kv 4680..32760 of the Gluon FP8 forms through shared memory (gluon-psmem, -k2, -m128, the persistent and staggered schedules; gluon-psmem's key splits 1..3) beside cuDNN and the bf16 default, no sweeps (bench/attention_bench.py --only)
attention-bf16-stagger|120|issue 22 target 1: the bf16 Triton ring attention at q 4680 / kv 4680..32760 with its key runs staggered by query tile (AttnConfig.stagger) and not, whole and in 2 key splits, beside cuDNN, no sweeps (bench/attention_bench.py --only)
sf-bf16-stagger|200|issue 22 target 2: Self-Forcing 1.3B bf16 block 5 with the bf16 ring attention unstaggered and staggered (FD_ATTN_STAGGER=0, 1), own processes on one machine, 7 blocks each, block-5 profiles
linear-tests|120|issue 22 target 5: on CUDA, tests/kernels/test_fp8_linear.py alone: the FP8 linears and their activation pass, the GELUs' fast-math forms (single MUFU exp2 and reciprocal by inline PTX, which the interpreter cannot run) against the forms before
block-fusion|60|issues 21, 22, 14: the Wan block's fused steps (GELU in the GEMM epilogue or FP8 quantization, residual + next norm in one pass) vs their unfused forms at SF, Wan2.2 A14B and Matrix-Game shapes (bench/block_fusion_bench.py)
taehv-upsample|90|issues 22, 16: TAEHV's nearest 2x upsampling as torch's NHWC kernel vs a broadcast copy (models/taehv.UPSAMPLE_AS_COPY): steady streaming decode at Self-Forcing's 480x832 and OmniDreams' 704x1280 with either form (alternated, frames bit-equal checked) and the upsampling alone (bench/taehv_upsample_bench.py)
hdmap-conv-forms|150|issue 16: every conv of OmniDreams' HD-map encode (LightVAE, steady 8-frame chunk, 704x1280, the engine's NDHWC + fused norms) timed as it runs and in other forms (cuDNN search, NDHWC input, 2-D conv over frames, three 2-D convs, time taps folded into channels, padded channels), each checked against its own output; the whole encode profiled by kernel kind (bench/hdmap_conv_forms.py)
hdmap-encoder|60|issues 16, 14: OmniDreams' HD-map encode of a steady chunk at 704x1280 (LightVAE and the Wan VAE): two 4-frame passes vs one 8-frame pass vs channels_last_3d; the Wan VAE's steady decode at 352x640, NCDHW vs channels_last_3d; the engine's narrow forms padding up to 31 vs up to 48 input channels (bench/hdmap_encoder_bench.py)
fa4-tests|90|issue 22 (the *fa4 parts need flash-attn-4 installed: bench/fa4_wheels.sh): FlashAttention-4 on CUDA: the KV-ring form against its twin at several ring lengths with NaN past the length and inside a CUDA graph with the length changed between replays; the block-sparse form against its twin
sf-fa4|330|issue 22: fd-bench Self-Forcing 1.3B block 5 (random weights, 480x832, TAEHV) with our ring-attention kernel vs FlashAttention-4's (--attention triton,fa4) in one invocation, block-5 profile of each
omni-fa4|240|issues 16, 22: fd-bench OmniDreams 704x1280 chunk in bf16 with our ring-attention kernel vs FlashAttention-4's (--attention triton,fa4) in one invocation, chunk-4 profile of each
vsr-fa4|150|issue 20: FlashAttention-4's block-sparse kernel (not yet run on a GPU) against ours and dense SDPA on FlashVSR's steady 768x1408 q/k/v and mask, with its CUDA tests first (bench/family_parts.py vsr-attn)
fa4-sweep|150|issue 22: FlashAttention-4's sm90 forward at q 4680 / kv 4680..32760 over its tiles (128x112..128x192), PV-from-registers and key splits, each against cuDNN's output (bench/fa4_sweep.py)
rolling-fa4|300|issue 22: the bounded cache (sink 1 + window 11), eager with CUDA graphs: our ring-attention kernel vs FlashAttention-4's in one fd-bench invocation, 12 blocks + 150 steady blocks each, block-11 profile
taehv-layout|120|issues 22, 14: TAEHV's streaming decode at 480x832 and 352x640 in NHWC (its CUDA default since next32-h200: 10.16 vs 13.24 ms at 480x832) vs NCHW in one run each, frames compared (bench/decoders_bench.py --decoders taehv:nchw,taehv:nhwc)
sf-fp8-fa4|330|issues 22, 15: fd-bench Self-Forcing 1.3B block 5 in FP8 with our FP8 ring attention vs FP8 linears + FlashAttention-4's bf16 ring attention (--attention triton,fa4 --precision fp8) in one invocation with block-5 profiles, then that mix's quality against bf16 with FlashAttention-4 over 7 blocks
rolling-fp8-fa4|240|issue 22 target 4: the bounded cache (sink 1 + window 11) with FlashAttention-4 in bf16 and with FP8 linears (--attention fa4 --precision bf16,fp8) in one fd-bench invocation, 12 blocks + 150 steady, block-11 profiles (bar 230 ms; fa4 bf16 was 262.3)
omni-fp8-fa4|300|issue 16: fd-bench OmniDreams 704x1280 with FlashAttention-4 in bf16 and with FP8 linears (--attention fa4 --precision bf16,fp8) in one invocation, chunk-4 profiles, then the mix's quality over 7 chunks
vsr-fa4-stream|240|issue 20: fd-bench FlashVSR 768x1408 with our block-sparse kernel vs FlashAttention-4's (--attention triton,fa4) in one invocation, block-4 profile of each
vsr-profile|240|issue 20: fd-bench FlashVSR 768x1408 (sparse 2.0, our kernels, CUDA graphs) with a kernel profile of a steady block: where the 158 ms of denoise and 95 ms of TC decoder go
vsr-tc-layout|300|issue 20: fd-bench FlashVSR 768x1408 (our attention kernel, and FlashAttention-4's where installed) with the TC decoder's convs in NHWC (its default) and in NCHW (FD_TC_DECODER_LAYOUT=nchw), a block-4 profile each: 103 ms of a 227 ms block was elementwise/norm/rope in next25-h200
sf-fp8-shadow|330|issue 22: fd-bench Self-Forcing 1.3B block 5 in FP8 (FP8 linears, h quantized in the norms) with our FP8 ring attention reading the ring's fp8 shadow vs FlashAttention-4's bf16 ring attention (--attention triton,fa4 --precision fp8; without FlashAttention-4 installed: vs bf16 with our kernel), block-5 profiles, the all-FP8 run again with 2 key splits (FD_FP8_ATTN_SPLITS=2), then our all-FP8 path's quality against bf16 over 7 blocks (next39-h200 before the shadow: triton 329.0 ms with 52 ms of "other", fa4 316.0)
rolling-fp8|260|issue 22 target 4: the bounded cache (sink 1 + window 11) in bf16 and all-FP8 with our kernels (--attention triton --precision bf16,fp8), 12 blocks + 150 steady, block-11 profile: the FP8 stream's pace with the fp8 shadow's two-range update for wrapping blocks
lingbot-fp8-shadow|240|issue 15: fd-bench LingBot-World Fast 464x832 in FP8 with our FP8 ring attention (fp8 ring shadow) vs FlashAttention-4's bf16 (--attention triton,fa4 --precision fp8; without FlashAttention-4: our FP8 path alone), steady rollout of 12 blocks, block-7 profiles (next39-h200: fa4 fp8 block 7 1456.5 ms)
lingbot-fp8-camera|230|issue 15: LingBot-World Fast's camera layers kept in bf16 (the FP8 default) or in FP8 too (--fp8-keep ''): fd-bench FP8 block 7 with them in FP8 (run after lingbot-fp8-shadow in one call for the same-machine pair), then fp8_quality with both FP8 forms against bf16 over 7 blocks (next47/48-h100, before the default changed: camera FP8 block 7 1456.9 vs 1475.7 ms, rel. L2 0.0271 vs 0.0080)
lingbot-fp8-fastaccum|270|issue 15: LingBot-World Fast FP8 block 7 with the FP8 GEMMs' fast accumulation (FD_FP8_FAST_ACCUM=1) against the default, own processes on one machine (8 blocks each, block-7 profiles), then the fast-accumulation FP8's quality against bf16 over 7 blocks
sf-fp8-fastaccum|200|issue 22: Self-Forcing 1.3B FP8 block 5 with the FP8 GEMMs' fast accumulation (FD_FP8_FAST_ACCUM=1) against the default, own processes on one machine (7 blocks each, block-5 profiles), then its quality against bf16 over 7 blocks
hopper-attn-tests|200|issues 22, 15: on an sm_90 GPU, the Gluon FP8 ring attention (kernels/ring_attention_fp8_hopper.py, every form) against the Triton FP8 kernel and exact attention, the FD_FP8_ATTN_KERNEL route and the default, then the FP8 attention tests on CUDA (tests/kernels/test_fp8_attention.py, through the default route)
sf-fp8-gluon|330|issue 22: Self-Forcing 1.3B FP8 block 5 with the FP8 attention on the Triton kernel and on the Gluon kernel (FD_FP8_ATTN_KERNEL=triton, gluon-psmem, gluon-psmem-persistent-stagger (the route's choice at this grid); FD_SUITE_FP8_KERNELS names others), own processes on one machine (7 blocks each, block-5 profiles), then the FP8 quality against bf16 over 7 blocks of gluon-psmem (or FD_SUITE_FP8_QUALITY_KERNEL)
lingbot-fp8-gluon|200|issue 15: LingBot-World Fast FP8 block 7 with the FP8 attention on the Gluon kernel (FD_FP8_ATTN_KERNEL=gluon-psmem) and on the Triton kernel, own processes on one machine (8 blocks each, block-7 profiles)
rolling-fp8-200|200|issue 22 target 4: the bounded cache (sink 1 + window 11) all-FP8 alone, 12 blocks + 200 steady blocks (the bar's 'flat over 200 blocks'), block-11 profile
hopper-bf16-tests|200|issue 22 target 1: on an sm_90 GPU, the Gluon bf16 ring attention (kernels/ring_attention_hopper.py, every tiling; never run on a GPU before) against our Triton kernel and exact attention, NaN past the ring length, one CUDA graph over changing ring lengths, the FD_RING_ATTN_KERNEL route
sf-gluon-bf16|330|issue 22 target 2: Self-Forcing 1.3B bf16 block 5 with our Triton ring attention and with the Gluon kernel (FD_RING_ATTN_KERNEL=triton, gluon, gluon-n128), own processes on one machine, 7 blocks each, block-5 profiles
lingbot-fp8-splits|130|issue 15: fd-bench LingBot-World Fast 464x832 in FP8 (our FP8 attention, fp8 ring shadow) with the attention's keys whole and split in two (FD_FP8_ATTN_SPLITS=1, 2), one process each, 8 blocks: the other side of the FP8 kernel's grid rule (kernels/ring_attention_fp8.py SPLIT_BELOW_PROGRAMS_PER_SM)
lingbot-fa4|300|issue 15: fd-bench LingBot-World Fast 464x832 (stream preset, TAEHV, CUDA graphs) with FlashAttention-4 in bf16 and with FP8 linears (--attention fa4 --precision bf16,fp8) in one invocation: steady rollout of 12 blocks, frames handed out, kernel profile of block 7
snapshot|150|snapshots: Self-Forcing 1.3B (random weights, TAEHV, Triton, CUDA graphs) after 3 blocks: size, ms to take and restore on the device and through host memory, the block after a restore against the original (bit for bit) (bench/snapshot_bench.py)
worlds-lockstep|200|issue 19: Matrix-Game 2.0 universal 352x640 as 8 lockstep worlds (engine.worlds at batch 8, TAEHV, Triton): ms per step in step vs a plain batch-8 session, and with one world reset on its own (two batches per step, the other rows held), peak memory of each, the reset world against a lone one (bench/lockstep_worlds.py)
cp-graphs|200|issue 23 (a multi-GPU kind): Self-Forcing 1.3B over every GPU of the host (1, 2, 4, 8), Ulysses, blocks replayed as CUDA graphs with the NCCL collectives inside (captured or the error recorded), profiled steady blocks
cp-sf|240|issue 23 (a multi-GPU kind): Self-Forcing 1.3B 480x832 over 1..all GPUs, Ulysses then ring attention, eager: p50/p99, scaling efficiency, communication from a profiled block, peak memory, 10 blocks against one GPU
cp-lingbot|540|issue 23 (a multi-GPU kind): LingBot-World Fast 14B 464x832 (stream preset) over 1..all GPUs, Ulysses then ring attention, as cp-sf
cp-wan22|540|issue 23 (a multi-GPU kind): Causal Wan2.2 A14B (both experts) 480x832 over 1..all GPUs, Ulysses, as cp-sf
cp-omni|300|(a multi-GPU kind): OmniDreams 704x1280 over 1..all GPUs, Ulysses then ring attention, as cp-sf (not on issue 23's list: the driving world's chunk latency on several GPUs)
wan22-more|330|issue 21: the same 6 blocks with cuDNN attention (sdpa) in bf16, then in FP8 (Triton), then FP8 vs bf16 latents over 3 blocks
"
declare -A PART_GROUPS=(
  [issue22]="attention sf-fp8"
  [issue19-14]="worlds-arena worlds-arena-fp32 worlds-mg mg-taehv mg-wanvae gpu-tests"
  [issue20-16]="flashvsr omnidreams flashvsr-more lingbot wan22-mem"
  [next]="mg-memory omni-fp8 lingbot-fp8-quality wan22-speed"
  [next2]="mg-inductor wan22-sdpa worlds-arena-profile"
  [next3]="fused-kernels omni-fp8 mg-taehv"
  [next4]="attn-splits wan22-speed sf-fp8 omni-fp8"
  [next5]="cudnn-bm"
  [next6]="fused-kernels omni-fp8"
  [next7]="fused-kernels block-fusion omni-fp8 wan22-speed sf-fp8"
  [next8]="fused-kernels hdmap-encoder omni-fp8 wan22-speed mg-taehv mg-wanvae"
  [next9]="vae-tests hdmap-encoder mg-wanvae omni-fp8 mg-memory"
  [next10]="mg-wanvae hdmap-encoder"
  [next11]="fused-kernels block-fusion hdmap-encoder wan22-speed sf-fp8 mg-wanvae"
  [next12]="worlds-tests worlds-arena-profile worlds-arena block-fusion hdmap-encoder"
  [next13]="vae-tests worlds-arena worlds-arena-profile omni-fp8 mg-wanvae"
  [next14]="worlds-tests worlds-arena worlds-arena-profile sf-fp8"
  [next15]="fused-kernels worlds-arena-profile worlds-arena omni-fp8"
  [next16]="worlds-tests vae-tests worlds-arena-long"
  [next18]="vae-tests hdmap-encoder omni-fp8"
  [next19]="hdmap-encoder omni-fp8 vae-tests"
  [next20]="worlds-mg wan22-speed"
  [next21]="fa4-tests sf-fa4 attention"
  [next22]="omni-fa4 rolling-fa4"
  [next23]="fa4-sweep"
  [next24]="build cold cold-pyc cold-warm-up"
  [next25]="fa4-tests vsr-fa4 vsr-fa4-stream"
  [next26]="taehv-layout sf-fp8-fa4"
  [next27]="rolling-fp8-fa4 omni-fp8-fa4"
  [next28]="lingbot-fa4"
  [next29]="worlds-lockstep"
  [next30]="build"
  [next31]="cold cold-warm-up vsr-tc-layout"
  [next36]="build cold-pyc cold-profile"
  [next37]="kernels attn-splits"
  [next40]="sf-fp8-shadow lingbot-fp8-shadow"
  [next41]="build cold-pyc cold-groups cold-profile"
  [next44]="build cold-pyc cold-groups attention"
  [next42]="sf-fp8-shadow attention lingbot-fp8-shadow"
  [next43]="rolling-fp8 lingbot-fp8-splits"
  [next46]="sf-fp8-shadow rolling-fp8"
  [next47]="lingbot-fp8-shadow lingbot-fp8-camera"
  [next50]="lingbot-fp8-fastaccum sf-fp8-fastaccum"
  [next51]="lingbot-fp8-block"
  [next52]="hopper-bf16-tests attention hopper-attn-tests"
  [next53]="sf-gluon-bf16 worlds-tests attention-lingbot snapshot"
  [next54]="lingbot-fp8-block rolling-fp8-200 sf-fp8-shadow"
  [next55]="omni-fp8 build cold-pyc cold-groups"
  [multi1]="cp-graphs cp-sf"
  [multi2]="cp-lingbot"
  [multi3]="cp-wan22"
  [multi4]="cp-omni"
  [round2]="gpu-smoke kernels decoders sf-eager"
  [round4]="engine eager-vs-engine"
  [round5]="build cold eager-vs-engine"
  [round6]="sf-fp8 rolling fp8-kernels"
  [round8]="probe engine rolling"
  [round9]="engine rolling"
  [round10]="engine eager-vs-engine rolling"
  [round11]="engine rolling"
)

usage() {
  cat <<EOF
usage: bash bench/gpu_suite.sh [--smoke] [--dry-run] [--name NAME] [--budget SECONDS] PART_OR_GROUP...

Runs the named parts in order inside one budget (default ${BUDGET} s, \$FD_BUDGET_S) and writes
<out>/NAME/suite.json, suite.log and one JSON per part (<out>: \$FD_SUITE_OUT, else \$OUT, else
bench/results). --smoke runs the parts that have a CPU form on tiny shapes under the Triton
interpreter (no install); --dry-run prints each part's commands.

parts (cap in seconds: what it measures):
EOF
  while IFS='|' read -r name cap what; do
    [ -n "$name" ] && printf '  %-16s %4s s  %s\n' "$name" "$cap" "$what"
  done <<<"$PART_TABLE"
  echo
  echo "groups:"
  for g in $(printf '%s\n' "${!PART_GROUPS[@]}" | sort -V); do
    printf '  %-16s %s\n' "$g" "${PART_GROUPS[$g]}"
  done
}

part_cap() { awk -F'|' -v n="$1" '$1 == n {print $2}' <<<"$PART_TABLE"; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --smoke) SMOKE=1 ;;
    --dry-run) DRY=1 ;;
    --name) NAME=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    -*) echo "gpu_suite: unknown option $1 (see --help)" >&2; exit 2 ;;
    *)
      if [ -n "${PART_GROUPS[$1]+x}" ]; then
        read -r -a more <<<"${PART_GROUPS[$1]}"
        PARTS+=("${more[@]}")
      elif [ -n "$(part_cap "$1")" ]; then
        PARTS+=("$1")
      else
        echo "gpu_suite: unknown part or group '$1' (see --help)" >&2
        exit 2
      fi
      ;;
  esac
  shift
done
if [ ${#PARTS[@]} -eq 0 ]; then
  usage >&2
  exit 2
fi
if ! [[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]]; then
  echo "gpu_suite: --name must be letters, digits, '.', '_' or '-' (the device returns only such names)" >&2
  exit 2
fi
DEST=${FD_SUITE_OUT:-${OUT:-$REPO/bench/results}}/$NAME
ENGINE=$WORK/engine-work/engine # the full-size engine the engine or build part leaves for later parts
ENGINE_FP8=$WORK/engine-work/engine-fp8 # the FP8 one of build-fp8
ENGINE_OMNI=$WORK/engine-work/engine-omni # the OmniDreams one of omni-build
T0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - T0))); }

# ----------------------------------------------------------------------------- running

RUNDIR=$REPO
SITE=""
install() {
  # On the device: the package installed beside the checkout (its package-dir mapping needs an
  # install), and every command run from $WORK so the checkout's folders shadow nothing.
  if [ $SMOKE = 1 ] || [ "${FD_SUITE_NO_INSTALL:-0}" = 1 ] || [ $DRY = 1 ]; then
    return 0
  fi
  rm -rf "$WORK/site"
  $PY -m pip install -q --no-deps --no-build-isolation --no-index --target "$WORK/site" "$REPO" 2>&1 | grep -v -i warn | tail -2
  SITE=$WORK/site
  RUNDIR=$WORK
}

# py LIMIT ARGS...: python in the run folder, killed after LIMIT seconds (10 more, then KILL).
py() {
  local limit=$1
  shift
  if [ $DRY = 1 ]; then
    echo "  [dry-run] (limit ${limit} s) $PY $*"
    return 0
  fi
  if [ "$limit" -lt 5 ]; then # (timeout 0 would mean no limit at all)
    echo "gpu_suite: no time left for: $PY $*"
    return 124
  fi
  (cd "$RUNDIR" && PYTHONPATH="${SITE}${SITE:+:}${PYTHONPATH:-}" timeout -k 10 "$limit" "$PY" "$@")
}

micro() { # micro LIMIT SCRIPT NAME: a micro-benchmark of bench/ (`benchmark.micro`'s command line) -> $DEST/NAME.json
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/$2" --smoke --out "$DEST/$3.json"
  else
    py "$1" "$REPO/bench/$2" --out "$DEST/$3.json"
  fi
}

# ----------------------------------------------------------------------------- parts

SF="--preset self-forcing-1.3b --random-weights --decoder taehv --attention triton"

part_env() {
  py "$1" - "$DEST/env.json" "$REPO" <<'EOF'
import json, subprocess, sys
import torch
from flashdreams.benchmark.environment import environment
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
env = environment(dev)
def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=15).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {e}"
env["git_commit"] = env.get("git_commit") or sh("git", "-C", sys.argv[2], "rev-parse", "HEAD") or None
env["git_dirty_files"] = len(sh("git", "-C", sys.argv[2], "status", "--short").splitlines())
if dev.type == "cuda":
    env["nvidia_smi"] = sh("nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu", "--format=csv,noheader")
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
}

part_attention-lingbot() {
  local budget=$(($1 - 25))
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/attention_bench.py" --smoke --budget-s "$budget" --out "$DEST/attention-lingbot.json"
  else
    py "$1" "$REPO/bench/attention_bench.py" --shapes lingbot --budget-s "$budget" --out "$DEST/attention-lingbot.json"
  fi
}

part_attention() {
  local budget=$(($1 - 25))
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/attention_bench.py" --smoke --budget-s "$budget" --out "$DEST/attention.json"
  else
    py "$1" "$REPO/bench/attention_bench.py" --budget-s "$budget" --out "$DEST/attention.json"
  fi
}

sf_fp8_quality() { # sf_fp8_quality LIMIT NAME [ARGS...]: Self-Forcing FP8 vs bf16 over 7 blocks (bench/fp8_quality.py,
  # ARGS added; the smoke: the tiny model, 2 blocks, no decoder) -> $DEST/NAME.json
  local limit=$1 name=$2
  shift 2
  if [ $SMOKE = 1 ]; then
    py "$limit" "$REPO/bench/fp8_quality.py" --preset tiny --blocks 2 --no-decoder --out "$DEST/$name.json"
  else
    py "$limit" "$REPO/bench/fp8_quality.py" "$@" --blocks 7 --out "$DEST/$name.json"
  fi
}

part_sf-fp8() {
  # fd-bench: bf16 and fp8 in one invocation (same weights, prompt and draws), profile of block 5;
  # then the quality of fp8 against bf16 over 7 blocks with what is left.
  local t0 rc
  t0=$(date +%s)
  if [ $SMOKE = 1 ]; then
    py "$1" -m flashdreams.cli.bench --preset tiny --attention triton --precision bf16,fp8 --decoder none \
      --blocks 2 --rollouts 1 --profile-block 1 --quick-ceilings --out "$WORK/sf-fp8"
  else
    py $(($1 > 200 ? $1 - 90 : $1 * 2 / 3)) -m flashdreams.cli.bench $SF --precision bf16,fp8 --blocks 7 --rollouts 2 --profile-block 5 \
      --out "$WORK/sf-fp8"
  fi
  rc=$?
  [ $DRY = 1 ] || cp "$WORK/sf-fp8/results.json" "$DEST/sf-fp8-fdb.json" 2>/dev/null
  local rest=$(($1 - ($(date +%s) - t0)))
  sf_fp8_quality "$rest" fp8-quality || rc=$?
  return $rc
}

part_gpu-smoke() {
  [ $SMOKE = 1 ] && { echo "gpu-smoke has no CPU form (it compares CUDA with the CPU)"; return 0; }
  py "$1" "$REPO/bench/gpu_smoke.py" --out "$DEST/gpu-smoke.json"
}

part_kernels() {
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/kernels_bench.py" --smoke --no-sweep --no-compile-check --out "$DEST/kernels.json"
  else
    py "$1" "$REPO/bench/kernels_bench.py" --out "$DEST/kernels.json"
  fi
}

part_decoders() {
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/decoders_bench.py" --tiny --device cpu --dtype fp32 --out "$DEST/decoders.json"
  else
    py "$1" "$REPO/bench/decoders_bench.py" --out "$DEST/decoders.json"
  fi
}

fdb_to() { # fd-bench into $WORK/$1, its results.json copied to $DEST/$1.json
  local name=$1 limit=$2 rc
  shift 2
  py "$limit" -m flashdreams.cli.bench "$@" --out "$WORK/$name"
  rc=$?
  [ $DRY = 1 ] || cp "$WORK/$name/results.json" "$DEST/$name.json" 2>/dev/null
  rm -rf "$WORK/$name/engines"
  return $rc
}

part_sf-eager() {
  if [ $SMOKE = 1 ]; then
    fdb_to sf-eager "$1" --preset tiny --attention sdpa,triton --decoder none --blocks 2 --rollouts 1 --quick-ceilings
  else
    fdb_to sf-eager "$1" $SF --attention sdpa,triton --blocks 7 --rollouts 2
  fi
}

part_lingbot-fp8-block() {
  if [ $SMOKE = 1 ]; then
    fdb_to lingbot-fp8-block "$1" --preset lingbot-world-fast-tiny --attention triton --precision fp8 --blocks 3 \
      --rollouts 1 --profile-block 2 --quick-ceilings
  else
    fdb_to lingbot-fp8-block "$1" --preset lingbot-world-fast-stream --random-weights --attention triton \
      --precision fp8 --blocks 8 --rollouts 1 --profile-block 7 --quick-ceilings
  fi
}

part_fp8-kernels() {
  local budget=$(($1 - 20))
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/fp8_bench.py" --smoke --sections attention,peak --budget-s "$budget" --out "$DEST/fp8-kernels.json"
  else
    py "$1" "$REPO/bench/fp8_bench.py" --budget-s "$budget" --out "$DEST/fp8-kernels.json"
  fi
}

part_engine() {
  # shellcheck disable=SC2086 # FD_SUITE_ENGINE_ARGS is a list of options
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/engine_bench.py" --preset tiny --workdir "$WORK/engine-work" --budget $(($1 - 10)) \
      ${FD_SUITE_ENGINE_ARGS:-} --out "$DEST/engine.json"
  else
    py "$1" "$REPO/bench/engine_bench.py" --workdir "$WORK/engine-work" --budget $(($1 - 10)) \
      --build-timeout $(($1 - 110)) ${FD_SUITE_ENGINE_ARGS:-} --out "$DEST/engine.json"
  fi
}

built_already() { # built_already DIR: true (and says so) if an engine is built at DIR
  [ -f "$1/manifest.json" ] && echo "an engine is there already: $1"
}

part_build() {
  built_already "$ENGINE" && return 0
  if [ $SMOKE = 1 ]; then
    py "$1" -m flashdreams.cli.build --device cpu --decoder none --out "$ENGINE" && bundle_summary
  else
    # The H200 build overran 400 s in "compile dit" (the H100 took 102-109 s in all; next34-h200: the build
    # process busy stringifying nested Inductor IR, caller past faulthandler's 100 frames): every 60 s, the
    # build's whole main-thread stack (bench/stack_watch.py) and the busiest processes.
    local sampler rc
    py 60 -c "import time, torch; from torch._inductor import config; from torch._inductor.async_compile import AsyncCompile as A
t = time.perf_counter(); A.wait_pool_ready(timeout=50); ok = A.use_process_pool()
print('inductor compile_threads', config.compile_threads, 'worker_start', config.worker_start_method, 'process pool', ok,
      'ready in %.1f s' % (time.perf_counter() - t))"
    (while sleep 60; do
      echo "== build: busiest processes at $(date +%T)"
      ps -eo pid,ppid,etimes,pcpu,rss,args --sort=-pcpu | cut -c1-160 | head -12
    done) &
    sampler=$!
    py "$1" "$REPO/bench/stack_watch.py" 60 flashdreams.cli.build $SF --out "$ENGINE"
    rc=$?
    kill $sampler 2>/dev/null
    bundle_summary
    return $rc
  fi
}

part_cold() {
  cold_runs cold "$1"
}

part_build-fp8() {
  local ENGINE=$ENGINE_FP8 rc # (bundle_summary reads $ENGINE)
  built_already "$ENGINE" && return 0
  if [ $SMOKE = 1 ]; then
    py "$1" -m flashdreams.cli.build --device cpu --decoder none --attention triton --precision fp8 --out "$ENGINE"
  else
    py "$1" -m flashdreams.cli.build $SF --precision fp8 --out "$ENGINE"
  fi
  rc=$?
  bundle_summary
  decode_layout
  return $rc
}

decode_layout() { # the engine's decode graphs: weights taken channels-last, and our ops in the traced graph
  [ -f "$ENGINE/manifest.json" ] || return 0
  py 60 - "$ENGINE" <<'EOF'
import json, sys
from pathlib import Path
import importlib, pkgutil
import torch
import flashdreams.kernels as k
from flashdreams.export.backends.inductor import graph_ops
for m in pkgutil.iter_modules(k.__path__):  # (registers every op the graphs may call)
    importlib.import_module(f"{k.__name__}.{m.name}")
root = Path(sys.argv[1])
graphs = json.loads((root / "manifest.json").read_text())["graphs"]
for name in ("decode_first", "decode"):
    if name not in graphs:
        continue
    ep = torch.export.load(str(root / "graphs" / f"{name}.pt2"))
    ours = dict(graph_ops(ep))
    print(f"{name}: {len(graphs[name].get('channels_last', []))} weights channels-last; our ops {ours}")
EOF
}

part_engine-fp8() {
  if [ $DRY = 0 ] && [ ! -f "$ENGINE_FP8/manifest.json" ]; then
    echo "no FP8 engine at $ENGINE_FP8: run the build-fp8 part first"
    return 3
  fi
  if [ $SMOKE = 1 ]; then
    fdb_to engine-fp8 "$1" --preset tiny --attention triton --precision fp8 --backend eager,engine --engine "$ENGINE_FP8" \
      --decoder none --blocks 2 --rollouts 1 --profile-block 1 --quick-ceilings
  else
    fdb_to engine-fp8 "$1" $SF --precision fp8 --backend eager,engine --engine "$ENGINE_FP8" --blocks 7 --rollouts 1 \
      --profile-block 5 --quick-ceilings
  fi
}

OMNI="--preset omnidreams-sv --random-weights --attention triton"

part_omni-build() {
  local ENGINE=$ENGINE_OMNI rc # (bundle_summary reads $ENGINE)
  built_already "$ENGINE" && return 0
  if [ $SMOKE = 1 ]; then
    py "$1" -m flashdreams.cli.build --preset omnidreams-sv-tiny --device cpu --decoder none --out "$ENGINE"
  else
    py "$1" -m flashdreams.cli.build $OMNI --out "$ENGINE"
  fi
  rc=$?
  bundle_summary
  [ $rc = 0 ] && py 60 -c "import json, sys, torch
from flashdreams.export.backends.inductor import graph_ops
import flashdreams.kernels.conv_nhwc  # noqa: F401  (the ops the encoder graphs call)
m = json.load(open(sys.argv[1] + '/manifest.json'))
for name in ('encode_hdmap_first', 'encode_hdmap'):
    if name in m['graphs']:
        ep = torch.export.load(sys.argv[1] + '/graphs/' + name + '.pt2')
        print(name + ':', len(m['graphs'][name].get('channels_last', [])), 'weights channels-last; our ops',
              dict(graph_ops(ep)))" "$ENGINE"
  return $rc
}

part_omni-engine() {
  if [ $DRY = 0 ] && [ ! -f "$ENGINE_OMNI/manifest.json" ]; then
    echo "no OmniDreams engine at $ENGINE_OMNI: run the omni-build part first"
    return 3
  fi
  if [ $SMOKE = 1 ]; then
    fdb_to omni-engine "$1" --preset omnidreams-sv-tiny --backend eager,engine --engine "$ENGINE_OMNI" --decoder none \
      --blocks 2 --rollouts 1 --profile-block 1 --quick-ceilings
  else
    fdb_to omni-engine "$1" $OMNI --backend eager,engine --engine "$ENGINE_OMNI" --blocks 6 --rollouts 1 \
      --profile-block 4 --quick-ceilings
  fi
}

part_cold-fp8() {
  local ENGINE=$ENGINE_FP8 t0 # (cold_runs and unbundled_kernels read $ENGINE)
  t0=$(date +%s)
  byte_compile $(($1 / 3))
  cold_runs cold-fp8 $(($1 - ($(date +%s) - t0)))
}

part_decode-probe() {
  if [ $SMOKE = 1 ]; then
    TRITON_INTERPRET=1 py "$1" "$REPO/bench/decode_layout_probe.py" --device cpu --height 64 --width 64
  else
    py "$1" "$REPO/bench/decode_layout_probe.py"
  fi
}

part_engine-gpu-tests() {
  py "$1" -m pytest -q -p no:cacheprovider -rfs --rootdir "$REPO" "$REPO/tests/test_fp8_engine.py" \
    "$REPO/tests/test_export_engine_gpu.py" -k "fp8 or taehv or precision or omnidreams"
}

part_cold-groups() {
  # The cold-pyc processes again with Triton's group files installed as built (FD_BUNDLE_KEEP_GROUPS=1:
  # before the install repointed them, every bundled kernel our ops launch was a cache miss and compiled
  # at load): the same machine's cold start without the fix, against cold-pyc's with it.
  FD_BUNDLE_KEEP_GROUPS=1 cold_runs cold-groups "$1"
}

part_cold-full() {
  # The cold-pyc processes again with the install as before the slim one: every file of each bundled
  # Triton entry (TTIR, TTGIR, LLVM IR, PTX beside the binary) written by one thread; cold-pyc's figures
  # against these on the same machine are the slim threaded install's effect.
  FD_BUNDLE_IR=1 FD_INSTALL_THREADS=1 cold_runs cold-full "$1"
}

part_cold-warm-up() {
  # The same cold processes with fd-bench --warm-up: every block kind run and captured before block 0,
  # so the first blocks after load replay at steady speed (issue 22 target 6); the cold start includes it.
  cold_runs cold-warm-up "$1" --warm-up
}

part_warm-up-eager() {
  # No engine needed: the eager backend's first rollout after --warm-up shows whether block 0 runs at its
  # steady speed (next117: 308 ms against 162 while warm_up returned before its GPU work was done).
  if [ $SMOKE = 1 ]; then
    fdb_to warm-up-eager "$1" --preset tiny --attention triton --decoder none --blocks 3 --rollouts 1 --warm-up --quick-ceilings
  else
    fdb_to warm-up-eager "$1" $SF --blocks 4 --rollouts 2 --warm-up --quick-ceilings
  fi
}

part_cold-pyc() {
  # The lent image ships its Python packages without bytecode (a normal pip install writes it), so a
  # fresh process there compiles torch's and sympy's source first (6.4 s of 20 on the H100). Byte-compile
  # what a cold start imports, then measure the same three cold processes.
  local t0
  t0=$(date +%s)
  byte_compile $(($1 / 2))
  cold_runs cold-pyc $(($1 - ($(date +%s) - t0)))
}

byte_compile() { # byte_compile LIMIT: write the .pyc files the lent image lacks for what a cold start imports
  local site
  [ $SMOKE = 1 ] || [ $DRY = 1 ] && return 0
  site=$($PY -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
  (cd "$site" && timeout "$1" "$PY" -m compileall -q -j 0 torch sympy triton numpy mpmath networkx jinja2 \
    markupsafe filelock fsspec safetensors tqdm typing_extensions.py >/dev/null 2>&1)
  echo "byte-compiled the packages a cold start imports ($site)"
}

bundle_summary() { # what the engine's kernels.tar holds: files and MB by suffix (the install writes no IR text)
  [ -f "$ENGINE/kernels.tar" ] || return 0
  py 30 - "$ENGINE/kernels.tar" <<'EOF'
import collections, sys, tarfile
from pathlib import PurePosixPath
by = collections.defaultdict(lambda: [0, 0])
entries = set()
for m in tarfile.open(sys.argv[1]).getmembers():
    if m.isfile():
        kind, _, rest = m.name.partition("/")
        entries.add((kind, rest.split("/")[0] if kind == "triton" else rest))  # (install units: an entry or a file)
        suffix = PurePosixPath(m.name).suffix or "(none)"
        by[(kind, suffix)][0] += 1
        by[(kind, suffix)][1] += m.size
print(f"== kernels.tar: {len(entries)} entries, {sum(n for n, _ in by.values())} files, "
      f"{sum(b for _, b in by.values()) / 2**20:.1f} MB")
for (kind, suffix), (n, b) in sorted(by.items(), key=lambda kv: -kv[1][1]):
    print(f"  {kind:9s} {suffix:12s} {n:6d} files {b / 2**20:8.2f} MB")
EOF
}

unbundled_kernels() { # which Triton kernels the last cold load compiled: entries the bundle lacked, and bundled
  # entries Triton compiled again (a group file it could not follow: files written after the load began)
  py 30 - "$ENGINE/kernels.tar" "$WORK/cold-cache/triton" "${COLD_T0:-0}" <<'EOF'
import json, sys, tarfile
from pathlib import Path
bundled = {m.name.split("/")[1] for m in tarfile.open(sys.argv[1]).getmembers() if m.name.startswith("triton/")}
cache, t0 = Path(sys.argv[2]), float(sys.argv[3])
entries = [e for e in sorted(cache.iterdir()) if e.is_dir()] if cache.is_dir() else []
extra = [e for e in entries if e.name not in bundled]
# (the install rewrites the group files, so only the kernel's own files count)
again = [e for e in entries if e.name in bundled and t0 and any(
    f.stat().st_mtime >= t0 for f in e.iterdir() if not f.name.startswith("__grp__"))]
def names(e):
    found = [json.loads(m.read_text()).get("name", m.stem) for m in e.glob("*.json") if not m.name.startswith("__grp__")]
    return found or sorted(p.name for p in e.iterdir())
print(f"\n== Triton cache entries after the load that the bundle ({len(bundled)} entries) did not bring: {len(extra)}")
for e in extra:
    print(" ", e.name, names(e))
print(f"== bundled entries compiled again at the load (files newer than its start): {len(again)}")
for e in again:
    print(" ", e.name, names(e))
EOF
}

part_cold-profile() {
  # Where a cold load's seconds go once bytecode exists: one fresh process under cProfile, its top
  # functions by cumulative and by own time in cold-profile.txt.
  local attn=triton
  [ $SMOKE = 1 ] && attn=sdpa
  byte_compile $(($1 / 3))
  if [ $DRY = 0 ] && [ ! -f "$ENGINE/manifest.json" ]; then
    echo "no engine at $ENGINE: run the engine or build part first"
    return 3
  fi
  rm -rf "$WORK/cold-cache"
  COLD_T0=$(date +%s)
  TORCHINDUCTOR_CACHE_DIR=$WORK/cold-cache/inductor TRITON_CACHE_DIR=$WORK/cold-cache/triton \
    py $(($1 * 2 / 3)) -m cProfile -o "$WORK/cold.prof" -m flashdreams.cli.bench --backend engine --engine "$ENGINE" \
    --attention $attn --blocks 4 --rollouts 1 --quick-ceilings --out "$WORK/cold-prof" | grep -E "^(backend|engine) |dry-run"
  [ $DRY = 1 ] || py 60 "$REPO/bench/profile_summary.py" "$WORK/cold.prof" --top 70 \
    --callees "load_engine_dir" --callees "engine_runtime.py:[0-9]+\(__call__\)" \
    --callers "compiler/compiler.py:[0-9]+\(compile\)" --callers "jit.py:[0-9]+\(_do_compile\)" >"$DEST/cold-profile.txt"
  [ $DRY = 1 ] || unbundled_kernels >>"$DEST/cold-profile.txt"
  [ $DRY = 1 ] || grep -A30 "did not bring" "$DEST/cold-profile.txt" | head -30
  [ $DRY = 1 ] || head -40 "$DEST/cold-profile.txt"
}

cold_runs() { # cold_runs NAME LIMIT [FD-BENCH ARGS...]: fresh processes from the built engine -> $DEST/NAME.json
  # fd-bench's first run in a process records process start -> first frame and each block of the first
  # rollout; three fresh processes (FD_COLD_RUNS), each with empty Inductor / Triton caches, as on a new
  # machine; then the kernels the last one compiled that the engine's bundle lacked.
  local name=$1 limit=$2
  shift 2
  if [ $DRY = 0 ] && [ ! -f "$ENGINE/manifest.json" ]; then
    echo "no engine at $ENGINE: run the engine or build part first"
    return 3
  fi
  local i n=${FD_COLD_RUNS:-3} attn=triton # FD_COLD_RUNS: fewer processes when a call's device time is short
  local per=$((limit / n - 2))
  [ $SMOKE = 1 ] && attn=sdpa # the CPU engine of the build part's smoke form
  for i in $(seq "$n"); do
    rm -rf "$WORK/cold-cache" "$WORK/cold-$i" # (a failed run must not leave an earlier run's results to be read)
    COLD_T0=$(date +%s)
    TORCHINDUCTOR_CACHE_DIR=$WORK/cold-cache/inductor TRITON_CACHE_DIR=$WORK/cold-cache/triton \
      py "$per" -m flashdreams.cli.bench --backend engine --engine "$ENGINE" --attention $attn --blocks 4 --rollouts 1 \
      --quick-ceilings "$@" --out "$WORK/cold-$i" | grep -E "^(backend|engine) |dry-run"
  done
  [ $DRY = 1 ] && return 0
  py 30 - "$WORK" "$DEST/$name.json" "$n" <<'EOF'
import json, statistics, sys
from pathlib import Path
runs = []
for i in range(1, int(sys.argv[3]) + 1):
    p = Path(sys.argv[1]) / f"cold-{i}" / "results.json"
    if p.exists():
        r = json.loads(p.read_text())
        runs.append({"environment": r["environment"] if i == 1 else None, **r["runs"][0]["cold_start"]})
vals = [r["process_start_to_first_frame_s"] for r in runs if r.get("process_start_to_first_frame_s")]
out = {"what": "process start to first frame, fresh processes with empty compiler caches (fd-bench --backend engine)",
       "runs": runs, "median_s": statistics.median(vals) if vals else None, "target_s": 10.0}
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
print(f"cold start, process start to first frame: {[round(v, 2) for v in vals]} s, median {out['median_s']}")
EOF
  unbundled_kernels | tee "$DEST/$name-unbundled.txt" | head -20
}

part_eager-vs-engine() {
  if [ $DRY = 0 ] && [ ! -f "$ENGINE/manifest.json" ]; then
    echo "no engine at $ENGINE: run the engine or build part first"
    return 3
  fi
  if [ $SMOKE = 1 ]; then
    fdb_to eager-vs-engine "$1" --backend eager,engine --engine "$ENGINE" --decoder none --blocks 2 --rollouts 1 \
      --profile-block 1 --quick-ceilings
  else
    fdb_to eager-vs-engine "$1" $SF --backend eager,engine --engine "$ENGINE" --blocks 7 --rollouts 2 --profile-block 5
  fi
}

part_rolling() {
  if [ $SMOKE = 1 ]; then
    fdb_to rolling "$1" --preset tiny --decoder none --blocks 3 --rollouts 1 --steady-blocks 6 --quick-ceilings
  else
    fdb_to rolling "$1" --preset self-forcing-1.3b-rolling --random-weights --decoder taehv --attention triton \
      --backend eager,inductor --blocks 12 --rollouts 1 --steady-blocks 200 --profile-block 11
  fi
}

part_probe() {
  [ $SMOKE = 1 ] && { echo "probe has no CPU form (it builds for CUDA)"; return 0; }
  py 150 -m flashdreams.cli.build --device cuda --out "$WORK/tiny-engine" --force --no-progress || return $?
  py 60 -c "
import flashdreams, torch
e = flashdreams.load('$WORK/tiny-engine'); s = e.session(seed=1); r = [s.step() for _ in range(4)]
torch.cuda.synchronize(); print('probe ok', e.load_times, r[-1].frames.shape)"
}

part_aoti-probe() {
  [ $SMOKE = 1 ] && { echo "aoti-probe has no CPU form (the CPU aoti engine is tested in CI)"; return 0; }
  py "$1" "$REPO/bench/aoti_probe.py" --out "$DEST/aoti-probe.json" --work "$WORK/aoti-probe"
}

# ----------------------------------------------------------------------------- issues 19, 14, 20, 16, 15

MG="--preset matrix-game-2-universal --random-weights --height 352 --width 640 --attention triton"

rows_to() { # bench/worlds_rows.py (fd-bench sessions, one N at a time) into $WORK/$1, copied to $DEST/$1.json
  local name=$1 limit=$2 rc
  shift 2
  py "$limit" "$REPO/bench/worlds_rows.py" --budget-s $((limit - 10)) -- "$@" --out "$WORK/$name"
  rc=$?
  [ $DRY = 1 ] || cp "$WORK/$name/results.json" "$DEST/$name.json" 2>/dev/null
  return $rc
}

part_worlds-arena() {
  if [ $SMOKE = 1 ]; then
    rows_to worlds-arena "$1" --preset arena --sessions 1,2,4 --blocks 3
  else
    rows_to worlds-arena "$1" --preset arena --sessions 1,2,4,8,16,32,64,128,256 --blocks 30
  fi
}

part_worlds-arena-profile() {
  if [ $SMOKE = 1 ]; then
    rows_to worlds-arena-profile "$1" --preset arena --sessions 1,4 --blocks 3 --profile-block 0
  else
    rows_to worlds-arena-profile "$1" --preset arena --sessions 1,64 --blocks 30 --profile-block 0
  fi
}

part_worlds-arena-long() {
  # Three fresh processes, 1000 blocks per count: a 30-block row of one world lasts ~11 ms, so the N = 1
  # baseline of the scan above moves by 30% from run to run; these rows are the ones to read the ratio from.
  local i blocks=1000 rc=0
  [ $SMOKE = 1 ] && blocks=3
  for i in 1 2 3; do
    rows_to worlds-arena-long-$i $(($1 / 3)) --preset arena --sessions 1,64 --blocks $blocks || rc=$?
  done
  return $rc
}

part_worlds-arena-fp32() {
  if [ $SMOKE = 1 ]; then
    rows_to worlds-arena-fp32 "$1" --preset arena --dtype float32 --sessions 1,2 --blocks 3
  else
    rows_to worlds-arena-fp32 "$1" --preset arena --dtype float32 --sessions 1,64 --blocks 30
  fi
}

part_worlds-mg() {
  if [ $SMOKE = 1 ]; then
    rows_to worlds-matrixgame "$1" --preset matrix-game-2-tiny --decoder taehv --sessions 1,2 --blocks 2
  else
    rows_to worlds-matrixgame "$1" $MG --decoder taehv --sessions 1,2,4,8,16 --blocks 6
  fi
}

part_worlds-mg-fp8() {
  if [ $SMOKE = 1 ]; then
    rows_to worlds-matrixgame-fp8 "$1" --preset matrix-game-2-tiny --decoder taehv --attention triton --sessions 1,2 --blocks 2 --precision fp8
  else
    rows_to worlds-matrixgame-fp8 "$1" $MG --decoder taehv --sessions 1,8 --blocks 6 --precision fp8
  fi
}

part_mg-fp8() {
  local t0 rc
  t0=$(date +%s)
  if [ $SMOKE = 1 ]; then
    fdb_to mg-fp8 $(($1 / 2)) --preset matrix-game-2-tiny --decoder taehv --attention triton --precision bf16,fp8 \
      --blocks 2 --rollouts 1 --quick-ceilings
  else
    fdb_to mg-fp8 $(($1 * 2 / 3)) $MG --decoder taehv --precision bf16,fp8 --blocks 8 --rollouts 2 --profile-block 5
  fi
  rc=$?
  local rest=$(($1 - ($(date +%s) - t0)))
  if [ $SMOKE = 1 ]; then
    py "$rest" "$REPO/bench/fp8_quality.py" --preset matrix-game-2-tiny --blocks 2 --out "$DEST/mg-fp8-quality.json" || rc=$?
  else
    py "$rest" "$REPO/bench/fp8_quality.py" --preset matrix-game-2-universal --height 352 --width 640 --blocks 7 \
      --out "$DEST/mg-fp8-quality.json" || rc=$?
  fi
  return $rc
}

part_mg-taehv() {
  if [ $SMOKE = 1 ]; then
    fdb_to mg-taehv "$1" --preset matrix-game-2-tiny --decoder taehv --blocks 3 --rollouts 1 --profile-block 2 --quick-ceilings
  else
    fdb_to mg-taehv "$1" $MG --decoder taehv --blocks 8 --rollouts 2 --profile-block 5
  fi
}

part_mg-splits() {
  local rc=0 each=$(($1 / 3)) args
  if [ $SMOKE = 1 ]; then
    args="--preset matrix-game-2-tiny --decoder taehv --blocks 3 --rollouts 1 --quick-ceilings"
  else
    args="$MG --decoder taehv --blocks 8 --rollouts 2"
  fi
  fdb_to mg-splits-picked "$each" $args || rc=$?
  FD_ATTN_SPLITS=2 fdb_to mg-splits-2 "$each" $args || rc=$?
  fdb_to mg-splits-picked-again "$each" $args || rc=$?
  return $rc
}

part_mg-wanvae() {
  if [ $SMOKE = 1 ]; then
    fdb_to mg-wanvae "$1" --preset matrix-game-2-tiny --decoder preset --blocks 3 --rollouts 1 --profile-block 2 --quick-ceilings
  else
    fdb_to mg-wanvae "$1" $MG --decoder preset --blocks 8 --rollouts 2 --profile-block 5
  fi
}

part_gpu-tests() {
  # the installed package under test; the checkout gives the tests and their conftest (--rootdir)
  local t="$REPO/tests"
  local files="$t/test_cosmos_family.py $t/test_omnidreams_family.py $t/test_flashvsr.py $t/test_wan22_family.py"
  files="$files $t/kernels/test_block_sparse_attention.py $t/test_matrixgame_family.py"
  if [ $SMOKE = 1 ]; then
    py "$1" -m pytest -q -p no:cacheprovider --rootdir "$REPO" -m gpu $files
    return 0 # on a CPU every gpu test is skipped (pytest exits 5 when all are deselected)
  fi
  py "$1" -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" -m gpu $files
}

part_attn-splits() {
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/attention_splits_bench.py" --smoke --out "$DEST/attn-splits.json"
  else
    py "$1" "$REPO/bench/attention_splits_bench.py" --out "$DEST/attn-splits.json"
  fi
}

part_taehv-upsample() {
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/taehv_upsample_bench.py" --smoke --out "$DEST/taehv-upsample.json"
  else
    py "$1" "$REPO/bench/taehv_upsample_bench.py" --out "$DEST/taehv-upsample.json"
  fi
}

part_hdmap-conv-forms() {
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/hdmap_conv_forms.py" --smoke --out "$DEST/hdmap-conv-forms.json"
  else
    py "$1" "$REPO/bench/hdmap_conv_forms.py" --out "$DEST/hdmap-conv-forms.json"
  fi
}

part_op-sources() {
  local rc=0
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/op_sources.py" --smoke --out "$DEST/op-sources.txt" || rc=$?
  else
    py $(($1 / 2)) "$REPO/bench/op_sources.py" --preset omnidreams-sv --out "$DEST/op-sources-omni.txt" || rc=$?
    py $(($1 / 2)) "$REPO/bench/op_sources.py" --preset self-forcing-1.3b --decoder taehv \
      --out "$DEST/op-sources-sf.txt" || rc=$?
  fi
  return $rc
}

part_narrow-convs() {
  micro "$1" narrow_conv_bench.py narrow-convs
}

part_narrow-tests() {
  py "$1" -m pytest -q -p no:cacheprovider -rfs --rootdir "$REPO" "$REPO/tests/kernels/test_narrow_conv.py" \
    "$REPO/tests/test_taehv.py" "$REPO/tests/kernels/test_adaln.py" "$REPO/tests/kernels/test_fp8_linear.py" \
    "$REPO/tests/test_wan_vae.py" "$REPO/tests/kernels/test_bias_act.py" "$REPO/tests/kernels/test_upsample_frames.py" \
    "$REPO/tests/kernels/test_memblock_join.py" "$REPO/tests/kernels/test_ring_attention.py"
}

part_taehv-tests() {
  py "$1" -m pytest -q -p no:cacheprovider -rfs --rootdir "$REPO" "$REPO/tests/test_taehv.py" \
    "$REPO/tests/kernels/test_memblock_join.py" "$REPO/tests/kernels/test_bias_act.py" \
    "$REPO/tests/kernels/test_upsample_frames.py" "$REPO/tests/kernels/test_narrow_conv.py"
}

part_rows-tests() {
  py "$1" -m pytest -q -p no:cacheprovider -rfs --rootdir "$REPO" "$REPO/tests/kernels/test_fp8_attention.py" \
    "$REPO/tests/kernels/test_fp8_attention_hopper.py" -k "rows or shadow or hopper"
}

part_ring-tests() {
  local rc=0 t0
  t0=$(date +%s)
  part_rows-tests $(($1 / 3)) || rc=$?
  py $(($1 - ($(date +%s) - t0))) -m pytest -q -p no:cacheprovider -rfs --rootdir "$REPO" \
    "$REPO/tests/kernels/test_ring_attention.py" || rc=$?
  return $rc
}

part_ring-split-tests() {
  py "$1" -m pytest -q -p no:cacheprovider -rfs --rootdir "$REPO" "$REPO/tests/kernels/test_ring_attention.py"
}

part_row-tiles() {
  micro "$1" row_tiles_bench.py row-tiles
}

part_row-chunks() {
  micro "$1" row_chunks_bench.py row-chunks
}

part_cublaslt-workspace() {
  if [ $SMOKE = 1 ]; then
    echo "cublaslt-workspace: FP8 GEMMs on CUDA only"
    return 0
  fi
  py "$1" "$REPO/bench/cublaslt_workspace_bench.py" --sizes default,0 --out "$DEST/cublaslt-workspace.json"
}

part_gelu-quantize() {
  micro "$1" gelu_quantize_bench.py gelu-quantize
}

part_cudnn-bm() {
  if [ $SMOKE = 1 ]; then
    fdb_to cudnn-bm-mg "$1" --preset matrix-game-2-tiny --decoder preset --blocks 2 --rollouts 1 --quick-ceilings \
      --cudnn-benchmark off,on
    return
  fi
  fdb_to cudnn-bm-mg $(($1 * 2 / 5)) $MG --decoder preset --blocks 6 --rollouts 1 --cudnn-benchmark off,on
  fdb_to cudnn-bm-omni $(($1 * 3 / 5)) --preset omnidreams-sv --random-weights --attention triton \
    --precision bf16,fp8 --blocks 5 --rollouts 1 --cudnn-benchmark off,on
}

part_fused-kernels() {
  local t="$REPO/tests"
  py "$1" -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" $t/kernels/test_head_norm_rope.py \
    $t/kernels/test_fp8_linear.py $t/test_matrixgame_family.py $t/test_omnidreams_family.py \
    $t/kernels/test_adaln.py $t/test_dit_ops.py $t/kernels/test_action_attention.py $t/kernels/test_channel_rms_norm.py \
    -k "head_norm or twin or export or bad_arg or ring_attend or cuda_graph or shadow or gelu or fused or route or module or triton"
}

part_worlds-tests() {
  local t="$REPO/tests"
  py "$1" -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" $t/kernels/test_palette_snap.py \
    $t/test_session_gpu.py $t/test_batched_worlds.py $t/test_gym_env.py $t/test_snapshot.py
}

part_serve-spares() {
  micro "$1" serve_spares_bench.py serve-spares
}

part_session-tests() {
  py "$1" -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" "$REPO/tests/test_session_gpu.py"
}

part_attention-forms() {
  local budget=$(($1 - 20))
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/attention_bench.py" --smoke --only "fp8_kernel" --budget-s "$budget" --out "$DEST/attention-forms.json"
  else
    py "$1" "$REPO/bench/attention_bench.py" --only "gluon_psmem|^bf16$" --budget-s "$budget" --out "$DEST/attention-forms.json"
  fi
}

part_attention-bf16-stagger() {
  local budget=$(($1 - 20))
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/attention_bench.py" --smoke --only "^bf16(_split2)?(_stagger)?$" --budget-s "$budget" \
      --out "$DEST/attention-bf16-stagger.json"
  else
    py "$1" "$REPO/bench/attention_bench.py" --only "^bf16(_split2)?(_stagger)?$" --budget-s "$budget" \
      --out "$DEST/attention-bf16-stagger.json"
  fi
}

part_sf-bf16-stagger() {
  local rc=0 on
  for on in 0 1; do
    if [ $SMOKE = 1 ]; then
      FD_ATTN_STAGGER=$on fdb_to sf-bf16-stagger$on $(($1 / 2)) --preset tiny --attention triton \
        --decoder none --blocks 2 --rollouts 1 --quick-ceilings || rc=$?
    else
      FD_ATTN_STAGGER=$on fdb_to sf-bf16-stagger$on $(($1 / 2)) $SF --blocks 7 --rollouts 1 --profile-block 5 \
        --quick-ceilings || rc=$?
    fi
  done
  return $rc
}

part_sf-fp8-workspace() {
  local rc=0 round ws=${FD_SUITE_WORKSPACE:-0}
  for round in a b; do
    if [ $SMOKE = 1 ]; then
      FD_FP8_WORKSPACE_FREE=0 fdb_to sf-fp8-ws-default-$round $(($1 / 4)) --preset tiny --attention triton --decoder none --blocks 2 \
        --rollouts 1 --quick-ceilings || rc=$?
      CUBLASLT_WORKSPACE_SIZE=$ws fdb_to sf-fp8-ws$ws-$round $(($1 / 4)) --preset tiny --attention triton \
        --decoder none --blocks 2 --rollouts 1 --quick-ceilings || rc=$?
    else
      FD_FP8_WORKSPACE_FREE=0 fdb_to sf-fp8-ws-default-$round $(($1 / 4)) $SF --precision fp8 --blocks 7 --rollouts 1 --profile-block 5 \
        --quick-ceilings || rc=$?
      CUBLASLT_WORKSPACE_SIZE=$ws fdb_to sf-fp8-ws$ws-$round $(($1 / 4)) $SF --precision fp8 --blocks 7 --rollouts 1 \
        --profile-block 5 --quick-ceilings || rc=$?
    fi
  done
  return $rc
}

part_lingbot-fp8-workspace() {
  local rc=0
  if [ $SMOKE = 1 ]; then
    FD_FP8_WORKSPACE_FREE=0 fdb_to lingbot-fp8-ws-default $(($1 / 2)) --preset lingbot-world-fast-tiny --attention triton \
      --precision fp8 --blocks 2 --rollouts 1 --quick-ceilings || rc=$?
    fdb_to lingbot-fp8-ws0 $(($1 / 2)) --preset lingbot-world-fast-tiny --attention triton --precision fp8 --blocks 2 \
      --rollouts 1 --quick-ceilings || rc=$?
  else
    FD_FP8_WORKSPACE_FREE=0 fdb_to lingbot-fp8-ws-default $(($1 / 2)) --preset lingbot-world-fast-stream --random-weights \
      --attention triton --precision fp8 --blocks 6 --rollouts 1 --profile-block 5 --quick-ceilings || rc=$?
    fdb_to lingbot-fp8-ws0 $(($1 / 2)) --preset lingbot-world-fast-stream --random-weights --attention triton \
      --precision fp8 --blocks 6 --rollouts 1 --profile-block 5 --quick-ceilings || rc=$?
  fi
  return $rc
}

part_linear-tests() {
  py "$1" -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" "$REPO/tests/kernels/test_fp8_linear.py"
}

part_vae-tests() {
  local t="$REPO/tests"
  py "$1" -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" $t/test_wan_vae.py $t/test_omnidreams_family.py \
    $t/test_dit_ops.py $t/kernels/test_channel_rms_norm.py \
    -k "channels_last or cat_frames or hdmap or cuda_graph or route or fuses or narrow or padded"
}

cp_runs() { # cp_runs NAME LIMIT PRESETS MODE... [-- EXTRA...]: bench/context_parallel_bench.py over all GPUs per mode
  local name=$1 limit=$2 presets=$3 mode t0 n
  shift 3
  local modes=() extra=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do modes+=("$1"); shift; done
  [ $# -gt 0 ] && shift && extra=("$@")
  t0=$(date +%s)
  if [ $SMOKE = 1 ]; then # two gloo ranks on the CPU, the tiny model
    n=2 presets=tiny extra+=(--device cpu --attention sdpa --blocks 4)
  elif [ $DRY = 1 ]; then
    n=4
  else
    n=$($PY -c 'import torch; print(torch.cuda.device_count())')
  fi
  if [ "$n" -lt 2 ]; then
    echo "$name needs several GPUs (this machine shows $n): run it on nvidia-h200-x2, -x4 or -x8"
    return 3
  fi
  local rc=0 left i=0
  for mode in "${modes[@]}"; do # each mode gets an even share of what is left
    left=$(((limit - ($(date +%s) - t0)) / (${#modes[@]} - i)))
    i=$((i + 1))
    # NVLink multicast stays off (KINDS.md), whatever the environment already says.
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4 \
      py "$left" -m torch.distributed.run --nproc-per-node "$n" --master-port $((29500 + RANDOM % 1000)) \
      "$REPO/bench/context_parallel_bench.py" --preset "$presets" --mode ${mode%%:*} \
      $([ "${mode#*:}" != "$mode" ] && echo --ring-pass "${mode#*:}") --profile "${extra[@]}" \
      --out "$DEST/$name-${mode/:/-}.json" || rc=$?
  done
  return $rc
}

part_cp-graphs() {
  cp_runs cp-graphs "$1" self-forcing-1.3b ulysses -- --attention triton --cuda-graphs --blocks 10
}

part_cp-sf() {
  cp_runs cp-sf "$1" self-forcing-1.3b ulysses ring:q -- --attention triton --blocks 10
}

part_cp-lingbot() {
  cp_runs cp-lingbot "$1" lingbot-world-fast-stream ulysses ring:q -- --attention triton --blocks 10
}

part_cp-wan22() {
  cp_runs cp-wan22 "$1" wan2.2-a14b-t2v-rolling ulysses -- --attention triton --blocks 10
}

part_cp-omni() {
  cp_runs cp-omni "$1" omnidreams-sv ulysses ring:q -- --attention triton --blocks 8
}

part_fa4-tests() {
  py "$1" -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" "$REPO/tests/kernels/test_fa4_attention.py"
}

part_sf-fa4() {
  if [ $SMOKE = 1 ]; then # FlashAttention-4 needs a GPU: the smoke runs the same command with our kernel alone
    fdb_to sf-fa4 "$1" --preset tiny --attention triton --decoder none --blocks 2 --rollouts 1 --quick-ceilings
  else
    fdb_to sf-fa4 "$1" $SF --attention triton,fa4 --blocks 7 --rollouts 2 --profile-block 5
  fi
}

part_taehv-layout() {
  local size rc=0
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/decoders_bench.py" --device cpu --tiny --dtype fp32 --decoders taehv,taehv:nhwc \
      --out "$DEST/taehv-layout.json"
    return
  fi
  for size in 60x104 44x80; do # 480x832 (Self-Forcing, LingBot-ish) and 352x640 (Matrix-Game)
    py $(($1 / 2)) "$REPO/bench/decoders_bench.py" --decoders taehv:nchw,taehv:nhwc --latent-h ${size%x*} \
      --latent-w ${size#*x} --no-per-latent --out "$DEST/taehv-layout-$size.json" || rc=$?
  done
  return $rc
}

part_sf-fp8-fa4() {
  # FP8 linears with FlashAttention-4's bf16 ring attention (its FP8 forward is Blackwell-only) against
  # our all-FP8 path in one fd-bench invocation, then the mix's quality against bf16 + fa4.
  local t0 rc
  t0=$(date +%s)
  if [ $SMOKE = 1 ]; then # FlashAttention-4 needs a GPU: the smoke runs the same commands with our kernel alone
    fdb_to sf-fp8-fa4 $(($1 / 2)) --preset tiny --attention triton --precision fp8 --decoder none --blocks 2 \
      --rollouts 1 --quick-ceilings
  else
    fdb_to sf-fp8-fa4 $(($1 - 100)) $SF --attention triton,fa4 --precision fp8 --blocks 7 --rollouts 2 --profile-block 5
  fi
  rc=$?
  local rest=$(($1 - ($(date +%s) - t0)))
  sf_fp8_quality "$rest" sf-fp8-fa4-quality --attention fa4 || rc=$?
  return $rc
}

part_rolling-fp8-fa4() {
  if [ $SMOKE = 1 ]; then # FlashAttention-4 needs a GPU: the smoke runs the same command with our kernel alone
    fdb_to rolling-fp8-fa4 "$1" --preset tiny --attention triton --precision bf16,fp8 --decoder none --blocks 3 \
      --rollouts 1 --steady-blocks 6 --quick-ceilings
  else
    fdb_to rolling-fp8-fa4 "$1" --preset self-forcing-1.3b-rolling --random-weights --decoder taehv --attention fa4 \
      --precision bf16,fp8 --blocks 12 --rollouts 1 --steady-blocks 150 --profile-block 11
  fi
}

part_rolling-fp8() {
  # The bounded cache in bf16 and all-FP8 with our kernels (FP8 attention through the ring's fp8 shadow,
  # whose blocks that wrap around the window re-quantize their own two runs of rows only).
  if [ $SMOKE = 1 ]; then
    fdb_to rolling-fp8 "$1" --preset tiny --attention triton --precision bf16,fp8 --decoder none --blocks 3 \
      --rollouts 1 --steady-blocks 6 --quick-ceilings
  else
    fdb_to rolling-fp8 "$1" --preset self-forcing-1.3b-rolling --random-weights --decoder taehv --attention triton \
      --precision bf16,fp8 --blocks 12 --rollouts 1 --steady-blocks 150 --profile-block 11
  fi
}

part_rolling-fp8-200() {
  if [ $SMOKE = 1 ]; then
    fdb_to rolling-fp8-200 "$1" --preset tiny --attention triton --precision fp8 --decoder none --blocks 3 \
      --rollouts 1 --steady-blocks 6 --quick-ceilings
  else
    fdb_to rolling-fp8-200 "$1" --preset self-forcing-1.3b-rolling --random-weights --decoder taehv --attention triton \
      --precision fp8 --blocks 12 --rollouts 1 --steady-blocks 200 --profile-block 11
  fi
}

part_omni-fp8-fa4() {
  local t0 rc
  t0=$(date +%s)
  if [ $SMOKE = 1 ]; then
    fdb_to omni-fp8-fa4 $(($1 / 2)) --preset omnidreams-sv-tiny --attention triton --precision bf16,fp8 --blocks 2 \
      --rollouts 1 --quick-ceilings
  else
    fdb_to omni-fp8-fa4 $(($1 * 2 / 3)) --preset omnidreams-sv --random-weights --attention fa4 --precision bf16,fp8 \
      --blocks 6 --rollouts 2 --profile-block 4
  fi
  rc=$?
  local rest=$(($1 - ($(date +%s) - t0)))
  if [ $SMOKE = 1 ]; then
    py "$rest" "$REPO/bench/fp8_quality.py" --preset omnidreams-sv-tiny --decoder preset --blocks 2 \
      --out "$DEST/omni-fp8-fa4-quality.json" || rc=$?
  else
    py "$rest" "$REPO/bench/fp8_quality.py" --preset omnidreams-sv --decoder preset --attention fa4 --blocks 7 \
      --out "$DEST/omni-fp8-fa4-quality.json" || rc=$?
  fi
  return $rc
}

part_vsr-fa4-stream() {
  if [ $SMOKE = 1 ]; then # FlashAttention-4 needs a GPU: the smoke runs the same command with our kernel alone
    fdb_to vsr-fa4-stream "$1" --preset flashvsr-tiny --attention triton --blocks 3 --rollouts 1 --quick-ceilings
  else
    fdb_to vsr-fa4-stream "$1" --preset flashvsr --random-weights --attention triton,fa4 --blocks 6 --rollouts 1 \
      --profile-block 4
  fi
}

part_vsr-tc-layout() {
  local layout rc=0 attn=triton
  have_fa4 && attn=triton,fa4 # both attention kernels per layout where FlashAttention-4 is installed
  for layout in nhwc nchw; do
    if [ $SMOKE = 1 ]; then
      FD_TC_DECODER_LAYOUT=$layout fdb_to vsr-tc-$layout $(($1 / 2)) --preset flashvsr-tiny --blocks 3 --rollouts 1 \
        --quick-ceilings || rc=$?
    else
      FD_TC_DECODER_LAYOUT=$layout fdb_to vsr-tc-$layout $(($1 / 2)) --preset flashvsr --random-weights --attention $attn \
        --blocks 6 --rollouts 1 --profile-block 4 || rc=$?
    fi
  done
  return $rc
}

part_vsr-profile() {
  if [ $SMOKE = 1 ]; then
    fdb_to vsr-profile "$1" --preset flashvsr-tiny --attention triton --blocks 3 --rollouts 1 --profile-block 2 \
      --quick-ceilings
  else
    fdb_to vsr-profile "$1" --preset flashvsr --random-weights --attention triton --blocks 6 --rollouts 1 \
      --profile-block 4
  fi
}

have_fa4() { # FlashAttention-4's wheels installed (bench/fa4_wheels.sh)?
  [ $DRY = 0 ] && [ $SMOKE = 0 ] && PYTHONPATH="${SITE}${SITE:+:}${PYTHONPATH:-}" "$PY" -c "import flash_attn.cute" 2>/dev/null
}

part_sf-fp8-shadow() {
  # Against FlashAttention-4's bf16 attention where it is installed, else against bf16 with our kernel.
  local t0 rc vs="--attention triton --precision bf16,fp8"
  have_fa4 && vs="--attention triton,fa4 --precision fp8"
  t0=$(date +%s)
  if [ $SMOKE = 1 ]; then # FlashAttention-4 needs a GPU: the smoke runs the same commands with our kernel alone
    fdb_to sf-fp8-shadow $(($1 / 2)) --preset tiny --attention triton --precision fp8 --decoder none --blocks 2 \
      --rollouts 1 --quick-ceilings
  else
    # the first invocation (the bf16/FP8 pair) matters most: it keeps 3/5 of a short budget where the
    # reserve for the two runs after it would leave it none (next62-h200 skipped it with 167 s)
    local main=$(($1 - 180))
    [ "$main" -lt $(($1 * 3 / 5)) ] && main=$(($1 * 3 / 5))
    fdb_to sf-fp8-shadow "$main" $SF $vs --blocks 7 --rollouts 2 --profile-block 5
    # the same all-FP8 run with the attention's keys whole (FD_FP8_ATTN_SPLITS=1; the grid rule splits
    # Self-Forcing's in two), in its own process: the other side of fp8_splits_for on the same machine
    FD_FP8_ATTN_SPLITS=1 fdb_to sf-fp8-shadow-split1 70 $SF --attention triton --precision fp8 --blocks 7 \
      --rollouts 1 --profile-block 5
  fi
  rc=$?
  local rest=$(($1 - ($(date +%s) - t0)))
  sf_fp8_quality "$rest" sf-fp8-shadow-quality || rc=$?
  return $rc
}

part_lingbot-fp8-shadow() {
  # without FlashAttention-4 our FP8 path alone (a bf16 block takes ~1.9 s: compare with earlier runs)
  local vs="--attention triton --precision fp8"
  have_fa4 && vs="--attention triton,fa4 --precision fp8"
  if [ $SMOKE = 1 ]; then
    fdb_to lingbot-fp8-shadow "$1" --preset lingbot-world-fast-tiny --attention triton --precision fp8 --blocks 3 \
      --rollouts 1 --steady-blocks 4 --profile-block 2 --quick-ceilings
  else
    fdb_to lingbot-fp8-shadow "$1" --preset lingbot-world-fast-stream --random-weights $vs --blocks 8 --rollouts 1 \
      --steady-blocks 12 --profile-block 7
  fi
}

part_lingbot-fp8-camera() {
  local t0=$(date +%s) rc=0
  if [ $SMOKE = 1 ]; then
    fdb_to lingbot-fp8-camera-fp8 $(($1 / 2)) --preset lingbot-world-fast-tiny --attention triton --precision fp8 \
      --fp8-keep '' --blocks 3 --rollouts 1 --profile-block 2 --quick-ceilings || rc=$?
    py $(($1 - ($(date +%s) - t0))) "$REPO/bench/fp8_quality.py" --preset lingbot-world-fast-tiny --decoder preset \
      --blocks 2 --fp8-keep '' --out "$DEST/lingbot-fp8-camera-quality.json" || rc=$?
  else
    fdb_to lingbot-fp8-camera-fp8 100 --preset lingbot-world-fast-stream --random-weights --attention triton \
      --precision fp8 --fp8-keep '' --blocks 8 --rollouts 1 --profile-block 7 --quick-ceilings || rc=$?
    py $(($1 - ($(date +%s) - t0))) "$REPO/bench/fp8_quality.py" --preset lingbot-world-fast-stream --decoder preset \
      --blocks 7 --fp8-keep '' --out "$DEST/lingbot-fp8-camera-quality.json" || rc=$?
  fi
  return $rc
}

part_lingbot-fp8-fastaccum() {
  local t0=$(date +%s) rc=0 fast
  for fast in 0 1; do
    if [ $SMOKE = 1 ]; then
      FD_FP8_FAST_ACCUM=$fast fdb_to lingbot-fp8-fastaccum$fast $(($1 / 3)) --preset lingbot-world-fast-tiny \
        --attention triton --precision fp8 --blocks 3 --rollouts 1 --profile-block 2 --quick-ceilings || rc=$?
    else
      FD_FP8_FAST_ACCUM=$fast fdb_to lingbot-fp8-fastaccum$fast 90 --preset lingbot-world-fast-stream --random-weights \
        --attention triton --precision fp8 --blocks 8 --rollouts 1 --profile-block 7 --quick-ceilings || rc=$?
    fi
  done
  local preset=lingbot-world-fast-stream blocks=7
  [ $SMOKE = 1 ] && preset=lingbot-world-fast-tiny blocks=2
  FD_FP8_FAST_ACCUM=1 py $(($1 - ($(date +%s) - t0))) "$REPO/bench/fp8_quality.py" --preset $preset --decoder preset \
    --blocks $blocks --out "$DEST/lingbot-fp8-fastaccum-quality.json" || rc=$?
  return $rc
}

part_sf-fp8-fastaccum() {
  local t0=$(date +%s) rc=0 fast
  for fast in 0 1; do
    if [ $SMOKE = 1 ]; then
      FD_FP8_FAST_ACCUM=$fast fdb_to sf-fp8-fastaccum$fast $(($1 / 3)) --preset tiny --attention triton \
        --precision fp8 --decoder none --blocks 2 --rollouts 1 --quick-ceilings || rc=$?
    else
      FD_FP8_FAST_ACCUM=$fast fdb_to sf-fp8-fastaccum$fast 60 $SF --precision fp8 --blocks 7 --rollouts 1 \
        --profile-block 5 --quick-ceilings || rc=$?
    fi
  done
  FD_FP8_FAST_ACCUM=1 sf_fp8_quality $(($1 - ($(date +%s) - t0))) sf-fp8-fastaccum-quality || rc=$?
  return $rc
}

part_hopper-attn-tests() {
  py "$1" -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" "$REPO/tests/kernels/test_fp8_attention_hopper.py" \
    "$REPO/tests/kernels/test_fp8_attention.py"
}

part_sf-fp8-gluon() {
  # FD_SUITE_FP8_KERNELS: the FD_FP8_ATTN_KERNEL forms to run (default: triton gluon-psmem gluon-psmem-persistent-stagger);
  # FD_SUITE_FP8_QUALITY_KERNEL: the one whose quality is measured (default gluon-psmem)
  local t0=$(date +%s) rc=0 kernel
  for kernel in ${FD_SUITE_FP8_KERNELS:-triton gluon-psmem gluon-psmem-persistent-stagger}; do
    if [ $SMOKE = 1 ]; then
      FD_FP8_ATTN_KERNEL=$kernel fdb_to sf-fp8-$kernel $(($1 / 4)) --preset tiny --attention triton \
        --precision fp8 --decoder none --blocks 2 --rollouts 1 --quick-ceilings || rc=$?
    else
      FD_FP8_ATTN_KERNEL=$kernel fdb_to sf-fp8-$kernel 60 $SF --precision fp8 --blocks 7 --rollouts 1 \
        --profile-block 5 --quick-ceilings || rc=$?
    fi
  done
  FD_FP8_ATTN_KERNEL=${FD_SUITE_FP8_QUALITY_KERNEL:-gluon-psmem} sf_fp8_quality $(($1 - ($(date +%s) - t0))) \
    sf-fp8-gluon-quality || rc=$?
  return $rc
}

part_lingbot-fp8-gluon() {
  local rc=0 kernel
  for kernel in gluon-psmem triton; do
    if [ $SMOKE = 1 ]; then
      FD_FP8_ATTN_KERNEL=$kernel fdb_to lingbot-fp8-$kernel $(($1 / 2)) --preset lingbot-world-fast-tiny \
        --attention triton --precision fp8 --blocks 3 --rollouts 1 --profile-block 2 --quick-ceilings || rc=$?
    else
      FD_FP8_ATTN_KERNEL=$kernel fdb_to lingbot-fp8-$kernel $(($1 / 2)) --preset lingbot-world-fast-stream \
        --random-weights --attention triton --precision fp8 --blocks 8 --rollouts 1 --profile-block 7 --quick-ceilings \
        || rc=$?
    fi
  done
  return $rc
}

part_hopper-bf16-tests() {
  py "$1" -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" "$REPO/tests/kernels/test_ring_attention_hopper.py"
}

part_sf-gluon-bf16() {
  local rc=0 kernel
  for kernel in triton gluon gluon-n128; do
    if [ $SMOKE = 1 ]; then
      FD_RING_ATTN_KERNEL=$kernel fdb_to sf-bf16-$kernel $(($1 / 3)) --preset tiny --attention triton \
        --decoder none --blocks 2 --rollouts 1 --quick-ceilings || rc=$?
    else
      FD_RING_ATTN_KERNEL=$kernel fdb_to sf-bf16-$kernel $(($1 / 3)) $SF --blocks 7 --rollouts 1 --profile-block 5 \
        --quick-ceilings || rc=$?
    fi
  done
  return $rc
}

part_lingbot-fp8-splits() {
  local n rc=0
  for n in 1 2; do
    if [ $SMOKE = 1 ]; then
      FD_FP8_ATTN_SPLITS=$n fdb_to lingbot-fp8-split$n $(($1 / 2)) --preset lingbot-world-fast-tiny --attention triton \
        --precision fp8 --blocks 3 --rollouts 1 --quick-ceilings || rc=$?
    else
      FD_FP8_ATTN_SPLITS=$n fdb_to lingbot-fp8-split$n $(($1 / 2)) --preset lingbot-world-fast-stream --random-weights \
        --attention triton --precision fp8 --blocks 8 --rollouts 1 --quick-ceilings || rc=$?
    fi
  done
  return $rc
}

part_lingbot-fa4() {
  # fd-bench, one invocation: bf16 and FP8 linears, both with FlashAttention-4, each with a steady rollout
  # (the window of 15 + sink 3 frames is full from block 6) and a kernel profile of block 7.
  if [ $SMOKE = 1 ]; then # FlashAttention-4 needs a GPU: the smoke runs the same command with our kernel alone
    fdb_to lingbot-fa4 "$1" --preset lingbot-world-fast-tiny --attention triton --precision bf16,fp8 --blocks 3 \
      --rollouts 1 --steady-blocks 4 --profile-block 2 --quick-ceilings
  else
    fdb_to lingbot-fa4 "$1" --preset lingbot-world-fast-stream --random-weights --attention fa4 --precision bf16,fp8 \
      --blocks 8 --rollouts 1 --steady-blocks 12 --profile-block 7
  fi
}

part_fa4-sweep() {
  [ $SMOKE = 1 ] && { echo "fa4-sweep has no CPU form (FlashAttention-4 needs an sm90+ GPU)"; return 0; }
  py "$1" "$REPO/bench/fa4_sweep.py" --budget-s $(($1 - 30)) --out "$DEST/fa4-sweep.json"
}

part_omni-fa4() {
  if [ $SMOKE = 1 ]; then # FlashAttention-4 needs a GPU: the smoke runs the same command with our kernel alone
    fdb_to omni-fa4 "$1" --preset omnidreams-sv-tiny --attention triton --blocks 2 --rollouts 1 --quick-ceilings
  else
    fdb_to omni-fa4 "$1" --preset omnidreams-sv --random-weights --attention triton,fa4 --blocks 6 --rollouts 2 \
      --profile-block 4
  fi
}

part_rolling-fa4() {
  if [ $SMOKE = 1 ]; then
    fdb_to rolling-fa4 "$1" --preset tiny --attention triton --decoder none --blocks 3 --rollouts 1 --steady-blocks 6 \
      --quick-ceilings
  else
    fdb_to rolling-fa4 "$1" --preset self-forcing-1.3b-rolling --random-weights --decoder taehv --attention triton,fa4 \
      --blocks 12 --rollouts 1 --steady-blocks 150 --profile-block 11
  fi
}

part_hdmap-encoder() {
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/hdmap_encoder_bench.py" --smoke --out "$DEST/hdmap-encoder.json"
  else
    py "$1" "$REPO/bench/hdmap_encoder_bench.py" --out "$DEST/hdmap-encoder.json"
  fi
}

part_block-fusion() {
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/block_fusion_bench.py" --smoke --out "$DEST/block-fusion.json"
  else
    py "$1" "$REPO/bench/block_fusion_bench.py" --out "$DEST/block-fusion.json"
  fi
}

fam_to() { # bench/family_parts.py items into $DEST/$1.json
  local name=$1 limit=$2
  shift 2
  if [ $SMOKE = 1 ]; then
    TRITON_INTERPRET=1 py "$limit" "$REPO/bench/family_parts.py" --device cpu --tiny --blocks 2 --chunks 2 --reps 1 \
      --budget-s $((limit - 10)) --out "$DEST/$name.json" "$@"
  else
    py "$limit" "$REPO/bench/family_parts.py" --budget-s $((limit - 10)) --out "$DEST/$name.json" "$@"
  fi
}

part_flashvsr() {
  if [ $SMOKE = 1 ]; then
    fam_to flashvsr "$1" vsr-stream:flashvsr-tiny vsr-attn:flashvsr-tiny
  else
    fam_to flashvsr "$1" vsr-stream:flashvsr vsr-attn:flashvsr vsr-stream:flashvsr-1080p
  fi
}

part_flashvsr-more() {
  if [ $SMOKE = 1 ]; then
    echo "flashvsr-more has no CPU form (full-size presets only)"
    return 0
  fi
  fam_to flashvsr-more "$1" vsr-chain vsr-stream:flashvsr-faster vsr-stream:flashvsr-dense vsr-attn:flashvsr-1080p
}

part_omnidreams() {
  fam_to omnidreams "$1" omnidreams cosmos
}

part_cosmos() {
  if [ $SMOKE = 1 ]; then
    fam_to cosmos "$1" cosmos
  else
    fam_to cosmos "$1" --reps 3 cosmos
  fi
}

part_mg-steady() {
  if [ $SMOKE = 1 ]; then
    fdb_to mg-steady "$1" --preset matrix-game-2-tiny --decoder taehv --blocks 2 --rollouts 1 --steady-blocks 5 --quick-ceilings
  else
    fdb_to mg-steady "$1" $MG --decoder taehv --blocks 3 --rollouts 1 --steady-blocks 1000
  fi
}

part_omnidreams-triton() {
  fam_to omnidreams-triton "$1" --omni-attention triton omnidreams
}

part_vsr-fa4() {
  if [ $SMOKE = 1 ]; then
    echo "vsr-fa4 has no CPU form (FlashAttention-4 needs an sm90+ GPU)"
    return 0
  fi
  py 60 -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" "$REPO/tests/kernels/test_fa4_attention.py" -k block_sparse
  fam_to vsr-fa4 $(($1 - 60)) vsr-attn:flashvsr
}

part_lingbot-fp8() {
  [ $SMOKE = 1 ] && { echo "lingbot-fp8 has no CPU form here"; return 0; }
  py "$1" "$REPO/bench/lingbot_bench.py" --cuda-graphs --precision fp8 --out "$DEST/lingbot-fp8.json"
}

part_lingbot() {
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/lingbot_bench.py" ${FD_SUITE_LINGBOT_SMOKE:---device cpu --preset lingbot-world-fast-tiny --attention sdpa --blocks 2 --height 64 --width 96} \
      --out "$DEST/lingbot.json"
  else
    py "$1" "$REPO/bench/lingbot_bench.py" --cuda-graphs --out "$DEST/lingbot.json"
  fi
}

part_worlds-lockstep() {
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/lockstep_worlds.py" --preset matrix-game-2-tiny --worlds 2 --blocks 2 --out "$DEST/worlds-lockstep.json"
  else
    py "$1" "$REPO/bench/lockstep_worlds.py" $MG --decoder taehv --worlds 8 --blocks 6 --out "$DEST/worlds-lockstep.json"
  fi
}

part_snapshot() {
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/snapshot_bench.py" --preset tiny --repeats 2 --out "$DEST/snapshot.json"
  else
    py "$1" "$REPO/bench/snapshot_bench.py" $SF --out "$DEST/snapshot.json"
  fi
}

part_wan22-mem() {
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/wan22_memory.py" --out "$DEST/wan22-memory.json"
  else
    py "$1" "$REPO/bench/wan22_memory.py" --measure --out "$DEST/wan22-memory.json"
  fi
}

# ----------------------------------------------------------------------------- still owed (group next)

part_mg-memory() {
  if [ $SMOKE = 1 ]; then
    fdb_to mg-memory "$1" --preset matrix-game-2-tiny --decoder taehv --blocks 2 --rollouts 1 --steady-blocks 5 \
      --steady-inputs --input-latency 3 --quick-ceilings
  else
    fdb_to mg-memory "$1" $MG --decoder taehv --blocks 3 --rollouts 1 --steady-blocks 1000 --steady-inputs \
      --input-latency 30
  fi
}

part_omni-fp8() {
  local t0 rc
  t0=$(date +%s)
  if [ $SMOKE = 1 ]; then
    fdb_to omni-fp8 $(($1 / 2)) --preset omnidreams-sv-tiny --attention triton --precision bf16,fp8 --blocks 2 \
      --rollouts 1 --quick-ceilings
  else
    fdb_to omni-fp8 $(($1 * 2 / 3)) --preset omnidreams-sv --random-weights --attention triton --precision bf16,fp8 \
      --blocks 6 --rollouts 2 --profile-block 4
  fi
  rc=$?
  local rest=$(($1 - ($(date +%s) - t0)))
  if [ $SMOKE = 1 ]; then
    py "$rest" "$REPO/bench/fp8_quality.py" --preset omnidreams-sv-tiny --decoder preset --blocks 2 \
      --out "$DEST/omni-fp8-quality.json" || rc=$?
  else
    py "$rest" "$REPO/bench/fp8_quality.py" --preset omnidreams-sv --decoder preset --blocks 7 \
      --out "$DEST/omni-fp8-quality.json" || rc=$?
  fi
  return $rc
}

part_lingbot-fp8-quality() {
  if [ $SMOKE = 1 ]; then
    py "$1" "$REPO/bench/fp8_quality.py" --preset lingbot-world-fast-tiny --decoder preset --blocks 2 \
      --out "$DEST/lingbot-fp8-quality.json"
  else
    py "$1" "$REPO/bench/fp8_quality.py" --preset lingbot-world-fast-stream --decoder preset --blocks 7 \
      --out "$DEST/lingbot-fp8-quality.json"
  fi
}

part_wan22-speed() {
  if [ $SMOKE = 1 ]; then
    fdb_to wan22-speed "$1" --preset wan2.2-tiny --attention triton --decoder taehv --blocks 2 --rollouts 1 --quick-ceilings
  else
    fdb_to wan22-speed "$1" --preset wan2.2-a14b-t2v --random-weights --attention triton --decoder taehv --blocks 6 \
      --rollouts 1 --profile-block 5
  fi
}

part_mg-inductor() {
  if [ $SMOKE = 1 ]; then
    fdb_to mg-inductor "$1" --preset matrix-game-2-tiny --decoder taehv --backend inductor --blocks 3 --rollouts 1 \
      --profile-block 2 --quick-ceilings
  else
    fdb_to mg-inductor "$1" $MG --decoder taehv --backend inductor --blocks 8 --rollouts 2 --profile-block 5
  fi
}

part_wan22-sdpa() {
  if [ $SMOKE = 1 ]; then
    fdb_to wan22-sdpa "$1" --preset wan2.2-tiny --attention sdpa --decoder taehv --blocks 2 --rollouts 1 --quick-ceilings
  else
    fdb_to wan22-sdpa "$1" --preset wan2.2-a14b-t2v --random-weights --attention sdpa --decoder taehv --blocks 6 \
      --rollouts 1 --profile-block 5
  fi
}

part_wan22-inductor() {
  if [ $SMOKE = 1 ]; then
    fdb_to wan22-inductor "$1" --preset wan2.2-tiny --attention triton --backend inductor --decoder taehv --blocks 2 \
      --rollouts 1 --quick-ceilings
  else
    fdb_to wan22-inductor "$1" --preset wan2.2-a14b-t2v --random-weights --attention triton --backend inductor \
      --decoder taehv --blocks 6 --rollouts 1 --profile-block 5
  fi
}

part_wan22-more() {
  local t0 rc=0 tiny="--preset wan2.2-tiny --decoder taehv --blocks 2 --rollouts 1 --quick-ceilings"
  local full="--preset wan2.2-a14b-t2v --random-weights --decoder taehv --blocks 6 --rollouts 1"
  t0=$(date +%s)
  if [ $SMOKE = 1 ]; then
    fdb_to wan22-sdpa $(($1 / 3)) $tiny --attention sdpa || rc=$?
    fdb_to wan22-fp8 $(($1 / 3)) $tiny --attention triton --precision fp8 || rc=$?
  else
    fdb_to wan22-sdpa $(($1 / 3)) $full --attention sdpa || rc=$?
    fdb_to wan22-fp8 $(($1 / 3)) $full --attention triton --precision fp8 || rc=$?
  fi
  local rest=$(($1 - ($(date +%s) - t0)))
  if [ $SMOKE = 1 ]; then
    py "$rest" "$REPO/bench/fp8_quality.py" --preset wan2.2-tiny --no-decoder --blocks 2 \
      --out "$DEST/wan22-fp8-quality.json" || rc=$?
  else
    py "$rest" "$REPO/bench/fp8_quality.py" --preset wan2.2-a14b-t2v --no-decoder --blocks 3 \
      --out "$DEST/wan22-fp8-quality.json" || rc=$?
  fi
  return $rc
}

# ----------------------------------------------------------------------------- main

[ $DRY = 1 ] || mkdir -p "$DEST" "$WORK"
if [ $SMOKE = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
LOG=$DEST/suite.log
STATUS=$WORK/status.tsv
[ $DRY = 1 ] && STATUS=/dev/null # a dry run writes nothing, not even the work folder
: >"$STATUS"
[ $DRY = 1 ] || : >"$LOG"
echo "gpu_suite: parts ${PARTS[*]}, budget ${BUDGET} s, results in $DEST$([ $SMOKE = 1 ] && echo ' (smoke: CPU)')"
install
for part in env "${PARTS[@]}"; do
  cap=$(part_cap "$part")
  limit=$(($(left) - 15))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ $DRY = 0 ] && [ "$limit" -lt 20 ]; then
    echo "== $part: skipped ($(left) s left)"
    printf '%s\t%s\t%s\n' "$part" skipped 0 >>"$STATUS"
    continue
  fi
  echo "== $part (up to ${limit} s, $(left) s left)"
  t=$(date +%s)
  if [ $DRY = 1 ]; then
    "part_$part" "$limit"
    rc=$?
  else
    {
      echo "== $part (up to ${limit} s) at $(date -u +%H:%M:%S)"
      "part_$part" "$limit"
      echo "== $part exit $?"
    } >"$WORK/$part.log" 2>&1
    rc=$(tail -1 "$WORK/$part.log" | awk '{print $NF}')
    cat "$WORK/$part.log" >>"$LOG"
    grep -v -i -E "warn|^\s*$" "$WORK/$part.log" | tail -n "${FD_SUITE_TAIL:-30}"
  fi
  printf '%s\t%s\t%s\n' "$part" "$rc" $(($(date +%s) - t)) >>"$STATUS"
  echo "== $part: exit $rc in $(($(date +%s) - t)) s"
done
[ $DRY = 1 ] && exit 0
py 30 - "$DEST" "$STATUS" "$NAME" "$BUDGET" "$SMOKE" <<'EOF'
import json, sys, time
from pathlib import Path
dest, status, name, budget, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
env_p = dest / "env.json"
env = json.loads(env_p.read_text()) if env_p.exists() else None
parts = []
for line in status.read_text().splitlines():
    part, rc, secs = line.split("\t")
    parts.append({"part": part, "exit": rc if rc == "skipped" else int(rc), "seconds": int(secs)})
files = sorted(p.name for p in dest.iterdir() if p.is_file())
suite = {"schema": "fd-gpu-suite/1", "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         "smoke": smoke == "1", "budget_s": budget, "environment": env, "parts": parts, "files": files}
(dest / "suite.json").write_text(json.dumps(suite, indent=1))
env_p.unlink(missing_ok=True)  # folded into suite.json: one file fewer to bring back
files = sorted(p.name for p in dest.iterdir() if p.is_file())
print(f"gpu_suite: {len(files)} files in {dest}: {' '.join(files)}")
if len(files) > 8:
    print("gpu_suite: WARNING: the device machine returns at most 8 files; run fewer parts per call")
for p in parts:
    print(f"  {p['part']:<16} exit {p['exit']!s:<8} {p['seconds']:>5} s")
EOF
echo "gpu_suite: done in $(($(date +%s) - T0)) s"
