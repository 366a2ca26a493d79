"""The Gluon FP8 ring attention for Hopper (kernels/ring_attention_fp8_hopper.py) against the Triton FP8
kernel it can replace and the torch twin. Gluon has no CPU interpreter: the kernel tests need an sm_90
GPU; what the CPU can check (the switch and its refusal, the route rule, fake tensors, availability) runs
everywhere."""

from __future__ import annotations

import importlib

import pytest
import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.kernels.ring_attention_fp8_hopper import BLOCK_N, VARIANTS, hopper_fp8_available
from flashdreams.numerics import rel_l2

fp8mod = importlib.import_module("flashdreams.kernels.ring_attention_fp8")
ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def make_case(B, Lq, H, S, valid, seed=0):
    """RMS-normalised q/k (as Wan's norms make them), V ~ N(0, 1), d 128; the fp8 shadow of the ring."""
    g = torch.Generator().manual_seed(seed)

    def rms(*shape):
        x = torch.randn(*shape, generator=g)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))

    dev = torch.device("cuda")
    q = rms(B, Lq, H, 128).to(torch.bfloat16).to(dev)
    k = rms(B, S, H, 128).to(torch.bfloat16).to(dev)
    v = torch.randn(B, S, H, 128, generator=g).to(torch.bfloat16).to(dev)
    vl = torch.tensor([valid], dtype=torch.int32, device=dev)
    kv = fp8mod.quantize_kv_fp8(k, v, vl, BLOCK_N)
    return q, k, v, vl, kv


def run_kernel(q, kv, vl, splits, form):
    from flashdreams.kernels.ring_attention_fp8_hopper import launch_ring_attention_fp8_hopper

    qk_fac = q.shape[-1] ** -0.5 * fp8mod.LOG2E / fp8mod.E4M3_MAX
    return launch_ring_attention_fp8_hopper(q, kv, vl, qk_fac, splits, form)


def triton_kernel(q, kv, vl, splits):
    cfg = fp8mod.Fp8AttnConfig(64, 128, 4, 3, splits=splits, use_tma=True)
    return fp8mod.launch_ring_attention_fp8_quantized(q, kv, kv.v8t, vl, q.shape[-1] ** -0.5, cfg, True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
@pytest.mark.parametrize("form", list(VARIANTS))
@pytest.mark.parametrize("valid", [1, 128, 129, 1000, 4680])
@pytest.mark.parametrize("splits", [1, 2])
def test_matches_the_triton_kernel(form, valid, splits):
    """Same quantized operands, same formulas: the fresh-register forms agree with the Triton kernel to
    exp2/ordering noise; the tensor-core accumulation adds its ~14-bit rounding on top. LSE likewise."""
    precise = VARIANTS[form].precise_pv
    q, _, _, vl, kv = make_case(2, 200, 3, 5000, valid, seed=valid)
    out, lse = run_kernel(q, kv, vl, splits, form)
    # a persistent form ignores `splits`: on a grid of more CTAs than its 24 programs it runs each whole
    want, want_lse = triton_kernel(q, kv, vl, 1 if VARIANTS[form].persistent else splits)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # a staggered form takes the keys in another order: P's e4m3 rounding (against another running max) differs
    # by ~2% rel. L2 at these few tiles; its error against exact attention is held in the quality test
    assert rel_l2(out.float(), want.float()) < (5e-3 if precise and not VARIANTS[form].stagger else 3e-2)
    assert (lse - want_lse).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
def test_quality_against_exact_attention():
    """At a long ring (28080 keys, 220 tiles) both forms stay within the FP8 kernel's quality budget."""
    from flashdreams.kernels import ring_attention_reference

    q, k, v, vl, kv = make_case(1, 256, 2, 28160, 28080, seed=3)
    ref = ring_attention_reference(q.float(), k, v, vl, q.shape[-1] ** -0.5)
    base = rel_l2(triton_kernel(q, kv, vl, 1)[0].float(), ref)
    for form, variant in VARIANTS.items():
        err = rel_l2(run_kernel(q, kv, vl, 1, form)[0].float(), ref)
        assert err < 0.07 and err < base * (1.02 if variant.precise_pv else 1.2), (form, err, base)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
@pytest.mark.parametrize("form", ["gluon-psmem", "gluon-psmem-persistent"])
def test_no_valid_keys_gives_zero_and_minus_inf_lse(form):
    q, _, _, vl, kv = make_case(1, 64, 2, 512, 0)
    out, lse = run_kernel(q, kv, vl, 1, form)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()


@pytest.mark.parametrize(
    "programs, tiles, ctas",
    [(888, 220, 264), (888, 37, 264), (2840, 213, 264), (24, 37, 7), (24, 1, 7), (5, 10, 264), (7, 3, 2), (1, 4, 1)],
)
@pytest.mark.parametrize("parts", [2, 4])
def test_persistent_schedule_covers_every_tile_once_in_balanced_shares(programs, tiles, ctas, parts):
    """The persistent kernel's schedule (its twin): every key tile of every program is run exactly once, a
    program in at most `parts` runs numbered 0, 1, ... from its first tile; the full waves' programs whole,
    every CTA starting them together; no CTA runs more than the even share rounded up where the last wave's
    share is at least a (parts - 1)-th of a program. 888 x 220 on 264: Self-Forcing's block 5."""
    from flashdreams.kernels.ring_attention_fp8_hopper import persistent_runs

    runs = persistent_runs(programs, tiles, ctas, parts)
    assert len(runs) == ctas
    seen = torch.zeros(programs, tiles, dtype=torch.int32)
    per_program: dict[int, list[tuple[int, int]]] = {}
    for mine in runs:
        for prog, first, stop, part in mine:
            assert 0 <= first < stop <= tiles
            seen[prog, first:stop] += 1
            per_program.setdefault(prog, []).append((first, part))
    assert torch.equal(seen, torch.ones_like(seen))
    for got in per_program.values():
        assert len(got) <= parts and [part for _, part in sorted(got)] == list(range(len(got)))
    waves = programs // ctas
    for c, mine in enumerate(runs):
        assert mine[:waves] == [(c + w * ctas, 0, tiles, 0) for w in range(waves)]
    loads = [sum(stop - first for _, first, stop, _ in mine) for mine in runs]
    even = -(-programs * tiles // ctas)
    assert max(loads) <= max(even, waves * tiles + -(-tiles // (parts - 1)))
    if parts == 4 and (programs, tiles, ctas) in {(888, 220, 264), (888, 37, 264), (2840, 213, 264)}:
        assert max(loads) == even


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
@pytest.mark.parametrize("valid", [1, 129, 4680])
@pytest.mark.parametrize("ctas", [1, 5, 7, 264])
@pytest.mark.parametrize("name", ["gluon-psmem-persistent", "gluon-psmem-persistent-stagger"])
def test_persistent_runs_merge_to_the_unpersistent_kernel(valid, ctas, name):
    """The persistent forms on small grids (programs cut into runs at different tiles): the parts they wrote
    (LSE finite) are exactly the twin's runs; programs run whole equal the unpersistent Gluon kernel's (the same
    code over the same keys) where their keys are not rotated; all merge within the FP8 kernels' error of exact
    attention."""
    from flashdreams.kernels import ring_attention_reference
    from flashdreams.kernels.attention_merge import split_outputs
    from flashdreams.kernels.ring_attention_fp8_hopper import launch_hopper, persistent_runs

    form = VARIANTS[name]
    q, k, v, vl, kv = make_case(2, 200, 3, 5000, valid, seed=valid + ctas)
    qk_fac = q.shape[-1] ** -0.5 * fp8mod.LOG2E / fp8mod.E4M3_MAX
    bufs = split_outputs(q, form.parts)
    launch_hopper(q, kv, vl, qk_fac, bufs, form, ctas=ctas)
    n_m, tiles = -(-200 // 64), -(-valid // BLOCK_N)
    written: dict[int, set[int]] = {}
    for mine in persistent_runs(n_m * 2 * 3, tiles, ctas, form.parts):
        for prog, _, _, part in mine:
            written.setdefault(prog, set()).add(part)
    finite = torch.isfinite(bufs.l_buf)  # [parts, B, H, Lq]
    rows = torch.zeros(2, 3, 200, dtype=torch.bool, device=q.device)  # rows of programs cut into runs
    for prog, parts in written.items():
        b, h, m = prog // n_m // 3, prog // n_m % 3, prog % n_m
        for part in range(form.parts):
            tile_rows = finite[part, b, h, m * 64 : m * 64 + 64]
            assert bool(tile_rows.all()) == (part in parts) and (tile_rows.all() or not tile_rows.any()), (prog, part)
        rows[b, h, m * 64 : m * 64 + 64] = len(parts) > 1
    if (valid, ctas) in {(129, 7), (4680, 5), (4680, 7)}:
        assert rows.any(), "the small grid cut no program: the test would not test the merge"
    out, lse = bufs.finish()
    whole, whole_lse = run_kernel(q, kv, vl, 1, "gluon-psmem")
    kept = ~rows.permute(0, 2, 1)  # [B, Lq, H]
    if not form.stagger:
        assert torch.equal(out[kept], whole[kept]) and torch.equal(lse[~rows], whole_lse[~rows])
    elif ctas == 1 and valid == 4680:  # one CTA runs all 24 programs whole, those of query tiles 1-3 rotated
        assert not torch.equal(out, whole)
    ref = ring_attention_reference(q.float(), k, v, vl, q.shape[-1] ** -0.5)
    base = rel_l2(whole.float(), ref)
    assert rel_l2(out.float(), ref) < base * 1.2 + 1e-3
    assert (lse - whole_lse).abs().max().item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
@pytest.mark.parametrize("choice", list(VARIANTS))
def test_environment_switch_routes_the_shadowed_attention(monkeypatch, choice):
    """FD_FP8_ATTN_KERNEL sends the engine's route (the prequantized op) through the Gluon kernel."""
    q, _, _, vl, kv = make_case(1, 300, 4, 6000, 5555, seed=1)
    monkeypatch.setenv(fp8mod.KERNEL_ENV, choice)
    got = fp8mod.ring_attention_fp8_prequantized(q, kv, vl, return_lse=True)
    splits = fp8mod.fp8_splits_for(-(-300 // 64) * 4, torch.cuda.get_device_properties(0).multi_processor_count)
    direct = run_kernel(q, kv, vl, splits, choice)
    assert torch.equal(got[0], direct[0]) and torch.equal(got[1], direct[1])


def test_kernel_choice_is_refused_by_name(monkeypatch):
    """A value that names no kernel is refused before anything is launched (on any device); unset, the
    Gluon form measured fastest is chosen (used only where `hopper_fp8_available`)."""
    monkeypatch.setenv(fp8mod.KERNEL_ENV, "cutlass")
    with pytest.raises(InvalidArgumentError, match=fp8mod.KERNEL_ENV):
        fp8mod._kernel_choice()
    monkeypatch.setenv(fp8mod.KERNEL_ENV, "triton")
    assert fp8mod._kernel_choice() == "triton"
    monkeypatch.delenv(fp8mod.KERNEL_ENV)
    assert fp8mod._kernel_choice() == fp8mod.DEFAULT_HOPPER_FORM == "gluon-psmem"
    assert fp8mod.DEFAULT_HOPPER_FORM in VARIANTS and VARIANTS[fp8mod.DEFAULT_HOPPER_FORM].precise_pv


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
def test_default_route_on_hopper_is_the_gluon_kernel(monkeypatch):
    """Unset, the engine's route on sm_90 is a Gluon form: the persistent staggered one where the grid rule would
    split the keys (a short grid: 20 programs here), the default form elsewhere (1600 programs, the rule's whole
    keys); asked-for splits (FD_FP8_ATTN_SPLITS) or a named form keep theirs; "triton" brings back the Triton
    kernel."""
    q, _, _, vl, kv = make_case(1, 300, 4, 6000, 5555, seed=2)
    monkeypatch.delenv(fp8mod.KERNEL_ENV, raising=False)
    monkeypatch.delenv(fp8mod.SPLITS_ENV, raising=False)
    got = fp8mod.ring_attention_fp8_prequantized(q, kv, vl, return_lse=True)
    splits = fp8mod.fp8_splits_for(-(-300 // 64) * 4, torch.cuda.get_device_properties(0).multi_processor_count)
    assert splits == 2
    assert torch.equal(got[0], run_kernel(q, kv, vl, splits, fp8mod.SHORT_GRID_HOPPER_FORM)[0])
    monkeypatch.setenv(fp8mod.SPLITS_ENV, "2")
    got = fp8mod.ring_attention_fp8_prequantized(q, kv, vl, return_lse=True)
    assert torch.equal(got[0], run_kernel(q, kv, vl, 2, fp8mod.DEFAULT_HOPPER_FORM)[0])
    monkeypatch.delenv(fp8mod.SPLITS_ENV)
    monkeypatch.setenv(fp8mod.KERNEL_ENV, fp8mod.DEFAULT_HOPPER_FORM)
    got = fp8mod.ring_attention_fp8_prequantized(q, kv, vl, return_lse=True)
    assert torch.equal(got[0], run_kernel(q, kv, vl, splits, fp8mod.DEFAULT_HOPPER_FORM)[0])
    monkeypatch.setenv(fp8mod.KERNEL_ENV, "triton")
    tri = fp8mod.ring_attention_fp8_prequantized(q, kv, vl, return_lse=True)
    assert torch.equal(tri[0], triton_kernel(q, kv, vl, splits)[0])
    monkeypatch.delenv(fp8mod.KERNEL_ENV)
    q, _, _, vl, kv = make_case(1, 2560, 40, 700, 650, seed=4)  # 40 query tiles x 40 heads: a full grid
    assert fp8mod.fp8_splits_for(40 * 40, torch.cuda.get_device_properties(0).multi_processor_count) == 1
    got = fp8mod.ring_attention_fp8_prequantized(q, kv, vl, return_lse=True)
    assert torch.equal(got[0], run_kernel(q, kv, vl, 1, fp8mod.DEFAULT_HOPPER_FORM)[0])


def test_availability_needs_hopper_head_dim_128_and_the_key_tile():
    assert not hopper_fp8_available(torch.zeros(1, 4, 2, 128), BLOCK_N)  # not on a GPU
    if ON_HOPPER:
        q = torch.zeros(1, 4, 2, 128, device="cuda", dtype=torch.bfloat16)
        assert hopper_fp8_available(q, BLOCK_N)
        assert not hopper_fp8_available(q, 64)
        assert not hopper_fp8_available(torch.zeros(1, 4, 2, 64, device="cuda"), BLOCK_N)


def test_fake_tensors_get_shapes_without_a_launch():
    """Under torch.export's fake tensors the op's body (its own fake implementation) only allocates: no
    descriptor is built from a fake pointer and nothing is launched; the shapes are the op's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flashdreams.kernels.ring_attention_fp8_hopper import launch_ring_attention_fp8_hopper

    with FakeTensorMode():
        q = torch.empty(2, 100, 3, 128, device="cuda", dtype=torch.bfloat16)
        kv = fp8mod.Fp8KV(
            torch.empty(2, 3, 512, 128, device="cuda", dtype=torch.float8_e4m3fn),
            torch.empty(2, 3, 4, device="cuda"),
            torch.empty(2, 3, 128, 512, device="cuda", dtype=torch.float8_e4m3fn),
            torch.empty(2, 3, 4, device="cuda"),
            BLOCK_N,
        )
        vl = torch.empty(1, device="cuda", dtype=torch.int32)
        out, lse = launch_ring_attention_fp8_hopper(q, kv, vl, 0.01, 2, "gluon-psmem")
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 3, 100)


def test_route_rule(monkeypatch):
    """Which calls the Gluon kernel takes where it can serve (availability forced here): the picked config
    with fp8 P @ V only; not an explicit config, not bf16 P @ V, not with ops inlined into Inductor
    (FD_TRITON_OP_INLINE=1: Inductor takes Triton kernels into a graph, not Gluon ones), not "triton"; a short
    grid (the rule would split its keys) takes the persistent staggered form unless a form is named."""
    monkeypatch.setattr(fp8mod, "hopper_fp8_available", lambda q, block_n: True)
    monkeypatch.delenv(fp8mod.KERNEL_ENV, raising=False)
    monkeypatch.delenv("FD_TRITON_OP_INLINE", raising=False)
    q, kv = torch.zeros(1, 4, 2, 128), fp8mod.Fp8KV(*[torch.zeros(1)] * 4, BLOCK_N)
    cfg = fp8mod.Fp8AttnConfig(64, 128, 4, 3, splits=1, use_tma=True)
    assert fp8mod._hopper_form(q, kv, None, True) == "gluon-psmem"
    assert fp8mod._hopper_form(q, kv, None, True, short_grid=True) == fp8mod.SHORT_GRID_HOPPER_FORM
    assert VARIANTS[fp8mod.SHORT_GRID_HOPPER_FORM].persistent and VARIANTS[fp8mod.SHORT_GRID_HOPPER_FORM].stagger
    assert fp8mod._hopper_form(q, kv, cfg, True, short_grid=True) is None
    assert fp8mod._hopper_form(q, kv, cfg, True) is None
    assert fp8mod._hopper_form(q, kv, None, False) is None
    monkeypatch.setenv(fp8mod.KERNEL_ENV, "gluon")
    assert fp8mod._hopper_form(q, kv, None, True) == "gluon"
    assert fp8mod._hopper_form(q, kv, None, True, short_grid=True) == "gluon"  # a named form is kept
    monkeypatch.setenv(fp8mod.KERNEL_ENV, "triton")
    assert fp8mod._hopper_form(q, kv, None, True) is None
    monkeypatch.delenv(fp8mod.KERNEL_ENV)
    monkeypatch.setenv("FD_TRITON_OP_INLINE", "1")
    assert fp8mod._hopper_form(q, kv, None, True) is None
    monkeypatch.setattr(fp8mod, "hopper_fp8_available", lambda q, block_n: False)
    monkeypatch.delenv("FD_TRITON_OP_INLINE")
    assert fp8mod._hopper_form(q, kv, None, True) is None
