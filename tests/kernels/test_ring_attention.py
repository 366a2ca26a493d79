"""Ring attention (and the LSE merge) against its plain-torch twin, on fresh random inputs.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported). bf16 tolerances are loose there because the interpreter truncates
fp32 -> bf16 instead of rounding to nearest even (fp16 is exact and checked tightly).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import (  # noqa: E402
    AttnConfig,
    merge_attention,
    merge_attention_reference,
    require_triton,
    ring_attention,
    ring_attention_reference,
    rope_cache_write,
    rope_cache_write_reference,
    triton_available,
)
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402
from flashdreams.kernels.ring_attention import launch_ring_attention  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is first imported",
)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_case(B, Lq, H, d, S, valid, dtype, seed=0):
    """q and caches with NaN in every row >= valid, to prove those rows are never used."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, d, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(B, S, H, d, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(B, S, H, d, generator=g).to(dtype).to(DEVICE)
    k[:, valid:] = float("nan")
    v[:, valid:] = float("nan")
    return q, k, v, torch.tensor([valid], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,Lq,H,d,S,valid",
    [
        (1, 45, 2, 32, 150, 150),  # full ring, odd query count
        (2, 45, 3, 48, 150, 101),  # partial fill, d padded to 64
        (1, 30, 2, 64, 90, 17),  # valid ends inside the first key tile
        (1, 16, 2, 128, 64, 64),
        (1, 9, 1, 256, 40, 33),  # the largest head_dim
        (1, 12, 2, 20, 40, 40),  # a head_dim that is not a multiple of 8
    ],
)
def test_matches_twin(dtype, B, Lq, H, d, S, valid):
    q, k, v, vl = make_case(B, Lq, H, d, S, valid, dtype)
    with poisoned_outputs():
        out, lse = ring_attention(q, k, v, vl, return_lse=True)
    ref, ref_lse = ring_attention_reference(q, k, v, vl, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, H, Lq) and lse.dtype == torch.float32
    assert rel_l2(out, ref) < TOL[dtype]
    assert rel_l2(lse, ref_lse) < 1e-5
    assert ring_attention(q, k, v, vl).shape == q.shape


@pytest.mark.parametrize("elem", [2, 4], ids=["16-bit", "float32"])
def test_cuda_configs_fit_an_sm_of_shared_memory(elem, monkeypatch):
    """Every CUDA config the kernel can be given fits a Hopper SM's shared memory (227 KB) for 16-bit and
    float32 inputs. Its K/V pipeline takes num_stages x 2 x block_n x d_pad x element bytes (Triton asked for
    393232 bytes, 3 x 2 x 128 x 128 x 4 + 16, when float32 at head dim 128 took the bf16 entry on an H100)."""
    from flashdreams.kernels import ring_attention_configs as configs

    class CudaShapes:  # what the picker reads of q, without a GPU
        device = torch.device("cuda")

        def __init__(self, d: int) -> None:
            self.shape = (1, 4680, 12, d)

        def element_size(self) -> int:
            return elem

    monkeypatch.setattr(configs, "_sm_count", lambda device: 132)
    for d_pad in configs.CUDA_CONFIGS:
        cfg = configs._table_config(CudaShapes(d_pad), 28080)
        assert cfg.num_stages * 2 * cfg.block_n * d_pad * elem <= 232448, (d_pad, cfg)


CONFIGS = [
    AttnConfig(16, 16, splits=1),  # many key tiles, tail tile masked
    AttnConfig(32, 16, splits=3),  # split keys, LSE merge
    AttnConfig(16, 32, splits=2, use_tma=True),  # tensor-descriptor loads
    AttnConfig(64, 32, splits=4, use_tma=True, warp_specialize=True),  # more splits than some runs need
    AttnConfig(16, 16, splits=1, stagger=True),  # each query tile's keys from another tile on, wrapping
    AttnConfig(16, 16, splits=2, stagger=True, use_tma=True),  # staggered within each split
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_configs_match_twin(config, dtype):
    q, k, v, vl = make_case(2, 45, 2, 48, 120, 83, dtype, seed=1)
    with poisoned_outputs():
        out, lse = launch_ring_attention(q, k, v, vl, 0.2, config)
    ref, ref_lse = ring_attention_reference(q, k, v, vl, 0.2, return_lse=True)
    assert rel_l2(out, ref) < TOL[dtype]
    assert rel_l2(lse, ref_lse) < 1e-5


def test_strided_views_and_int64_valid_len():
    """A layer slice of a stacked [layers, B, S, N, d] cache, q a view of a fused qkv tensor."""
    g = torch.Generator().manual_seed(2)
    B, Lq, H, d, S, valid = 2, 20, 3, 32, 60, 47
    qkv = torch.randn(B, Lq, 3, H, d, generator=g).to(DEVICE)
    ks = torch.randn(4, B, S, H, d, generator=g).to(DEVICE)
    vs = torch.randn(4, B, S, H, d, generator=g).to(DEVICE)
    ks[:, :, valid:] = float("nan")
    q, k, v = qkv[:, :, 0], ks[2], vs[1]
    vl = torch.tensor(valid, dtype=torch.int64, device=DEVICE)  # 0-dim works too
    out = ring_attention(q, k, v, vl)
    assert rel_l2(out, ring_attention_reference(q, k, v, vl)) < 1e-5


def test_no_valid_keys_gives_zero_and_minus_inf_lse():
    q, k, v, _ = make_case(1, 8, 2, 32, 32, 0, torch.float32)
    out, lse = ring_attention(q, k, v, torch.tensor([0], device=DEVICE), return_lse=True)
    ref, ref_lse = ring_attention_reference(q, k, v, torch.tensor([0], device=DEVICE), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(out, ref)
    assert torch.isneginf(lse).all() and torch.isneginf(ref_lse).all()


def test_merge_of_key_shards_equals_whole():
    """Attention over two disjoint key shards, merged by LSE, equals attention over all keys."""
    q, k, v, _ = make_case(1, 33, 2, 48, 100, 100, torch.float32, seed=3)
    o1, l1 = ring_attention(q, k[:, :37], v[:, :37], torch.tensor([37], device=DEVICE), return_lse=True)
    o2, l2 = ring_attention(q, k[:, 37:], v[:, 37:], torch.tensor([63], device=DEVICE), return_lse=True)
    parts, lses = torch.stack([o1, o2]), torch.stack([l1, l2])
    with poisoned_outputs():
        out, lse = merge_attention(parts, lses)
    ref_out, ref_lse = merge_attention_reference(parts, lses)
    whole, whole_lse = ring_attention_reference(q, k, v, torch.tensor([100]), return_lse=True)
    assert rel_l2(out, ref_out) < 1e-6 and rel_l2(lse, ref_lse) < 1e-6
    assert rel_l2(out, whole) < 1e-5 and rel_l2(lse, whole_lse) < 1e-6


@pytest.mark.parametrize("sink", [0, 2])
def test_streaming_ring_equals_logical_window(sink):
    """Blocks written through the ring (wrapping several times) attend like the logical cache.

    The logical cache is what the reference keeps: the sink frames plus the newest
    `window` frames in time order. The ring holds the same rows in rotated order.
    """
    g = torch.Generator().manual_seed(4 + sink)
    B, H, d, fs, nf, window, blocks = 1, 2, 32, 15, 3, 4, 6
    L, S = nf * fs, (sink + window) * fs
    ring_k = torch.randn(B, S, H, d, generator=g).to(DEVICE)  # stale garbage from "before"
    ring_v = torch.randn(B, S, H, d, generator=g).to(DEVICE)
    frames_k, frames_v = [], []  # every frame's rotated k and raw v, in time order
    for blk in range(blocks):
        frames = range(blk * nf, (blk + 1) * nf)
        slots = torch.tensor([f if f < sink else sink + (f - sink) % window for f in frames], device=DEVICE)
        q, k, v = (torch.randn(B, L, H, d, generator=g).to(DEVICE) for _ in range(3))
        ang = (torch.rand(L, d // 2, generator=g) * 2 * math.pi).to(DEVICE)
        cos, sin = ang.cos(), ang.sin()
        twin_k, twin_v = ring_k.clone(), ring_v.clone()
        q_rot = rope_cache_write(q, k, v, cos, sin, ring_k, ring_v, slots, fs)
        q_twin = rope_cache_write_reference(q, k, v, cos, sin, twin_k, twin_v, slots, fs)
        assert torch.allclose(q_rot, q_twin, atol=1e-6) and torch.allclose(ring_k, twin_k, atol=1e-6)
        kr = twin_k.index_select(1, (slots[:, None] * fs + torch.arange(fs, device=DEVICE)).reshape(-1))
        frames_k += list(kr.split(fs, dim=1))
        frames_v += list(v.split(fs, dim=1))

        seen = (blk + 1) * nf
        valid = min(seen, sink + window) * fs
        logical = list(range(min(sink, seen))) + list(range(max(sink, seen - window), seen))
        lk = torch.cat([frames_k[f] for f in logical], dim=1)
        lv = torch.cat([frames_v[f] for f in logical], dim=1)
        assert lk.shape[1] == valid
        vl = torch.tensor([valid], device=DEVICE)
        out = ring_attention(q_rot, ring_k, ring_v, vl)
        expect = ring_attention_reference(q_rot, lk, lv, torch.tensor([valid], device=DEVICE))
        assert rel_l2(out, expect) < 1e-5, f"block {blk}"


def test_custom_op_export_and_eager_compile():
    q, k, v, vl = make_case(1, 20, 2, 32, 64, 40, torch.float32, seed=5)
    ref = ring_attention_reference(q, k, v, vl)
    out, lse = torch.ops.flashdreams.ring_attention(q, k, v, vl, 1.0 / math.sqrt(32))
    assert rel_l2(out, ref) < 1e-5

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, vl):
            return ring_attention(q, k, v, vl) * 2.0

    ep = torch.export.export(Attend(), (q, k, v, vl))
    assert "flashdreams.ring_attention" in str(ep.graph)
    assert rel_l2(ep.module()(q, k, v, vl), 2 * ref) < 1e-5
    backend = "inductor" if DEVICE.type == "cuda" else "eager"  # Inductor needs a GPU for Triton
    compiled = torch.compile(Attend(), backend=backend, fullgraph=True)
    assert rel_l2(compiled(q, k, v, vl), 2 * ref) < 1e-5


def test_require_triton_explains():
    with pytest.raises(InvalidArgumentError, match="cannot run on device 'meta'"):
        require_triton("meta")
    assert not triton_available("meta")


def test_bad_arguments_name_the_argument():
    q, k, v, vl = make_case(1, 8, 2, 32, 16, 16, torch.float32)
    with pytest.raises(InvalidArgumentError, match="k_cache"):
        ring_attention(q, k.half(), v, vl)
    with pytest.raises(InvalidArgumentError, match="v_cache"):
        ring_attention(q, k, v[:, :8], vl)
    with pytest.raises(InvalidArgumentError, match="valid_len"):
        ring_attention(q, k, v, torch.tensor([1.0], device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="valid_len"):
        ring_attention(q, k, v, torch.tensor([1, 2], device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="q"):
        ring_attention(q.transpose(1, 3), k, v, vl)
    with pytest.raises(InvalidArgumentError, match="scale"):
        ring_attention(q, k, v, vl, scale=-1.0)
    with pytest.raises(InvalidArgumentError, match="head_dim"):
        ring_attention(*make_case(1, 2, 1, 264, 4, 4, torch.float32)[:3], vl)


def _refused_before_load(monkeypatch, name: str) -> None:
    """With the knob `name` set to a bad value, loading a model with our kernels is refused by that name before
    anything of the model is looked up."""
    import flashdreams
    from flashdreams import registry

    with monkeypatch.context() as m:
        m.setattr(registry, "get_preset", lambda *a, **k: pytest.fail("loading started before the check"))
        with pytest.raises(InvalidArgumentError, match=name):
            flashdreams.load(decoder=None, attention="triton")


def test_splits_override_from_the_environment(monkeypatch):
    """FD_ATTN_SPLITS replaces the picked config's key splits (the bench's whole-block comparison): the call
    runs that many splits and still equals the twin; a value that is not a count from 1 to 8 is refused by
    name, in the call and when a model with our kernels loads (before anything is built)."""
    import importlib

    from flashdreams.kernels.ring_attention_configs import SPLITS_ENV, pick_config

    mod = importlib.import_module("flashdreams.kernels.ring_attention")  # the module, not its function

    q, k, v, vl = make_case(1, 30, 2, 64, 150, 140, torch.float32, seed=8)
    monkeypatch.delenv(SPLITS_ENV, raising=False)
    base = pick_config(q, k.shape[1])
    seen = []
    real = mod.split_outputs
    monkeypatch.setattr(mod, "split_outputs", lambda q, splits: seen.append(splits) or real(q, splits))
    ring_attention(q, k, v, vl)
    monkeypatch.setenv(SPLITS_ENV, "3")
    picked = pick_config(q, k.shape[1])
    assert picked.splits == 3 and dataclasses.replace(picked, splits=base.splits) == base
    out = ring_attention(q, k, v, vl)
    assert seen == [base.splits, 3] and base.splits != 3
    assert rel_l2(out, ring_attention_reference(q, k, v, vl)) < TOL[torch.float32]
    for bad in ("0", "two", "9", "-1"):
        monkeypatch.setenv(SPLITS_ENV, bad)
        with pytest.raises(InvalidArgumentError, match=SPLITS_ENV):
            ring_attention(q, k, v, vl)
    _refused_before_load(monkeypatch, SPLITS_ENV)


def test_key_splits_follow_the_last_wave():
    """On 132 SMs: Self-Forcing's block (37 query tiles x 12 heads = 444 programs, 3.4 waves) splits
    in two; LingBot's stream (36 x 40 = 1440, 10.9 waves: the last one 91% full) does not; a ring
    too short to keep 16 key tiles per split is never split."""
    from flashdreams.kernels.ring_attention_configs import choose_splits

    assert choose_splits(444, 132, 220) == 2
    assert choose_splits(1440, 132, 213) == 1
    assert choose_splits(444, 132, 20) == 1
    assert choose_splits(132, 132, 500) == 1  # exactly one full wave: nothing to even out


def test_stagger_from_the_environment(monkeypatch):
    """FD_ATTN_STAGGER=1 / 0 sets the picked config's stagger (the bench's whole-block comparison) and the call
    still equals the twin; another value is refused by name, in the call and when a model loads."""
    from flashdreams.kernels.ring_attention_configs import STAGGER_ENV, pick_config

    q, k, v, vl = make_case(1, 50, 2, 64, 150, 140, torch.float32, seed=9)
    monkeypatch.delenv(STAGGER_ENV, raising=False)
    base = pick_config(q, k.shape[1])
    assert not base.stagger
    monkeypatch.setenv(STAGGER_ENV, "1")
    picked = pick_config(q, k.shape[1])
    assert picked.stagger and dataclasses.replace(picked, stagger=False) == base
    assert rel_l2(ring_attention(q, k, v, vl), ring_attention_reference(q, k, v, vl)) < TOL[torch.float32]
    monkeypatch.setenv(STAGGER_ENV, "0")
    assert pick_config(q, k.shape[1]) == base
    monkeypatch.setenv(STAGGER_ENV, "yes")
    with pytest.raises(InvalidArgumentError, match=STAGGER_ENV):
        ring_attention(q, k, v, vl)
    _refused_before_load(monkeypatch, STAGGER_ENV)
