"""Launch configurations of the ring-attention kernel: tile shapes, pipelining, key splits.

Kept apart from the kernel because they are tuned, not derived: `bench/kernels_bench.py`
sweeps `SWEEP_CONFIGS` at Self-Forcing's shape on the H100, and the winner goes into
`CUDA_CONFIGS`. A config is chosen on the host from shapes alone (never from `valid_len`,
which lives on the device), so one compiled graph serves every block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ._common import env_choice, env_key_splits, next_pow2


@dataclass(frozen=True)
class AttnConfig:
    """Tile shape and launch knobs of the ring-attention kernel.

    `splits=0` picks the key split from the grid size; `use_tma` loads K/V through
    device-side tensor descriptors (Hopper's bulk copy engine; falls back to pointer loads
    where the strides do not allow it); `warp_specialize` asks Triton to split the key loop
    into producer and consumer warps; `stagger` starts each query tile's run of whole key tiles at a tile set
    by the query tile (wrapping around), so that the programs of a head running at once read different tiles.
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    splits: int = 0
    use_tma: bool = False
    warp_specialize: bool = False
    stagger: bool = False


# Chosen by head-dim tile (d padded to a power of two) on CUDA. The bench sweeps
# `SWEEP_CONFIGS` at Self-Forcing's shape; update the d=128 entry from its result.
CUDA_CONFIGS: dict[int, AttnConfig] = {
    16: AttnConfig(128, 64, 4, 3),
    32: AttnConfig(128, 64, 4, 3),
    64: AttnConfig(128, 64, 4, 3),
    # Tiles swept on the H100 (bench/results/kernels-h100.json): 474 / 515 / 507 TFLOP/s at kv
    # 4680 / 18720 / 32760, against cuDNN SDPA's 517 / 502 / 507 on the same data. One split:
    # on the H200, 2 and 3 splits were slower at every model's steady shape (Self-Forcing,
    # Wan2.2 A14B, OmniDreams, LingBot, Matrix-Game: bench/results/next4-h200/attn-splits.json),
    # the merge and the extra K/V passes costing more than the fuller last wave gains.
    128: AttnConfig(128, 128, 8, 3, splits=1, use_tma=True),
    256: AttnConfig(64, 32, 4, 2),
}
# float32 inputs (parity runs on a GPU, tests) take twice the shared memory a pipeline stage: the d=128 entry's
# 3 stages of 128-key K and V tiles ask for 384 KB, more than an H100/H200 SM has (227 KB; Triton refuses the
# launch, next90-h100). The same kernel with 64-row, 64-key tiles and 2 stages needs 128 KB.
CUDA_FP32_CONFIGS: dict[int, AttnConfig] = {128: AttnConfig(64, 64, 4, 2, splits=1)}
# The interpreter runs one program at a time with numpy: fewer, larger tiles are faster.
CPU_CONFIG = AttnConfig(64, 64, 1, 1, splits=1)

# What the bench sweeps at Self-Forcing's shape. Cross-compiled for sm_90 (triton 3.9), all of
# these use wgmma with no register spills except (128, 128, 8, 3) without TMA (8 bytes of
# stack); with 4 warps a 128-row tile spills heavily, so those are left out.
SWEEP_CONFIGS: list[AttnConfig] = [
    AttnConfig(128, 64, 8, 3, splits=1),
    AttnConfig(128, 64, 8, 3, splits=2),
    AttnConfig(128, 64, 8, 4, splits=1),
    AttnConfig(128, 128, 8, 2, splits=1),
    AttnConfig(128, 128, 8, 2, splits=2),
    AttnConfig(128, 128, 8, 3, splits=1),
    AttnConfig(64, 64, 4, 3, splits=1),
    AttnConfig(128, 64, 8, 3, splits=1, use_tma=True),
    AttnConfig(128, 64, 8, 3, splits=2, use_tma=True),
    AttnConfig(128, 64, 8, 4, splits=2, use_tma=True),
    AttnConfig(128, 128, 8, 2, splits=1, use_tma=True),
    AttnConfig(128, 128, 8, 3, splits=1, use_tma=True),
    AttnConfig(128, 128, 8, 3, splits=2, use_tma=True),
    AttnConfig(128, 64, 8, 3, splits=1, use_tma=True, warp_specialize=True),
    AttnConfig(128, 128, 8, 2, splits=1, use_tma=True, warp_specialize=True),
]


# Wave use a key split must add to be taken (bench/attention_splits_bench.py measures each model's shape).
SPLIT_GAIN = 0.05


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# FD_ATTN_SPLITS=N runs the bf16 kernel with N key splits (merged after) in place of the picked config's, so
# that the bench can weigh splits in whole blocks: next59's kernel alone ran Matrix-Game's steady shape in 0.383
# ms at 2 splits against 0.438 at 1, where the wave model (95% of the waves full) sees no gain. In the model
# (next87-h100, mg-splits) 2 splits made the block slower, 91.1 ms against 86.5 / 87.0 picked: the rule stays.
SPLITS_ENV = "FD_ATTN_SPLITS"


# FD_ATTN_STAGGER=1 staggers the picked config's key runs (AttnConfig.stagger), =0 not: a benchmark knob, so that
# the bench can weigh the stagger in whole blocks (the persistent FP8 kernel gained from it, the unpersistent one
# lost: kernels/ring_attention_fp8.py SHORT_GRID_HOPPER_FORM). On this kernel's plain grid it lost too (H100,
# bench/results/next106-h100): 471 against 510 TFLOP/s at kv 28080, Self-Forcing's bf16 block 5 392.9 against
# 355.3 ms (attention 269.4 against 238.5 ms): off by default.
STAGGER_ENV = "FD_ATTN_STAGGER"


def env_stagger() -> str:
    """FD_ATTN_STAGGER: "" (unset: the table's), "0" or "1"; anything else refused by name."""
    return env_choice(STAGGER_ENV, "", ("", "0", "1"))


def pick_config(q: torch.Tensor, capacity: int) -> AttnConfig:
    """The config for these shapes; on CUDA, `splits` evens out the last wave of programs (FD_ATTN_SPLITS,
    where set, overrides the key splits on every device; FD_ATTN_STAGGER the stagger)."""
    splits = env_key_splits(SPLITS_ENV)
    stagger = env_stagger()
    cfg = _table_config(q, capacity)
    if splits is not None:
        cfg = dataclasses.replace(cfg, splits=splits)
    return cfg if not stagger else dataclasses.replace(cfg, stagger=stagger == "1")


def _table_config(q: torch.Tensor, capacity: int) -> AttnConfig:
    d_pad = next_pow2(q.shape[-1], 16)
    if q.device.type != "cuda":
        return CPU_CONFIG
    cfg = CUDA_FP32_CONFIGS.get(d_pad) if q.element_size() == 4 else None
    cfg = cfg or CUDA_CONFIGS[d_pad]
    if cfg.splits:
        return cfg
    programs = _cdiv(q.shape[1], cfg.block_m) * q.shape[0] * q.shape[2]
    slots = _sm_count(q.device) * (1 if cfg.block_m * d_pad >= 128 * 128 else 2)
    return dataclasses.replace(cfg, splits=choose_splits(programs, slots, _cdiv(capacity, cfg.block_n)))


def choose_splits(programs: int, slots: int, key_tiles: int) -> int:
    """Key splits (1..4) for `programs` query tiles on `slots` concurrent programs over `key_tiles`.

    A split multiplies the programs, so the last, partly empty wave weighs less; it must keep
    >= 16 key tiles of work per program and beat the best so far by SPLIT_GAIN in wave use (the
    merge re-reads fp32 partials: ~1-2% of a call at the models' shapes)."""

    def efficiency(s: int) -> float:
        return programs * s / (_cdiv(programs * s, slots) * slots)

    best = 1
    for s in (2, 3, 4):
        if key_tiles // s >= 16 and efficiency(s) > efficiency(best) + SPLIT_GAIN:
            best = s
    return best
